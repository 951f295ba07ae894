"""LowBitHfQuantizer: the thin adapter between transformers' from_pretrained hooks and our package. No maths here."""

from __future__ import annotations

import copy
import json

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from . import calibrated, gptq, ops
from .activation_scales import calibrate, static_layers
from .calibration import METADATA_KEY, calibration_ids
from .checkpoints.paths import check_checkpoint_files
from .config import LowBitConfig
from .huge_pages import place_on_huge_pages
from .integrations.peft import register_if_peft_imported
from .integrations.transformers import keep_in_fp32_modules
from .loading import LowBitQuantize
from .model_card import attach_model_card, detach_model_card
from .modules import KeptLinear, LowBitLinear
from .offload import check_device_map, repack_offloaded_weights
from .parameter_count import attach_parameter_count, detach_parameter_count
from .replace import (
    check_skip_patterns,
    dequantize_modules,
    output_head_name,
    replace_linear_modules,
    replace_output_head,
)
from .serialization import check_prequantized_checkpoint, upgrade_layout


def _ignore(x) -> None:
    """An observer that records nothing: the layer runs with 16-bit activations (LowBitLinear.forward)."""


class LowBitHfQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: LowBitConfig

    def __init__(self, quantization_config: LowBitConfig, **kwargs):
        # Our own copy: loading records the resolved skip list in it, which must not leak into the user's object.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.modules_to_not_convert: list[str] = []
        self._layer_devices: set[str] = set()  # where the quantized layers' tensors ended up (is_compileable)
        # method="gptq": the 16-bit weights of the decoder blocks' layers wait on disk until their block is quantized
        self.stash: calibrated.WeightStash | None = None
        self.calibrated_layers: set[str] = set()  # the names of those layers
        self.calibration: dict | None = None  # what the saved checkpoint's metadata records

    def update_device_map(self, device_map):
        # As with bitsandbytes: without a device_map, load straight onto the accelerator when there is one.
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, LowBitLinear) and tensor_name == "weight"

    def get_quantize_ops(self):
        return LowBitQuantize(self)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, device_map=None, **kwargs):
        config = self.quantization_config
        # Before any weight is read: a shard name in the index may not lead outside the model's folder.
        check_checkpoint_files(checkpoint_files, getattr(model.config, "name_or_path", None))
        if config.skip_modules and not self.pre_quantized:
            # A saved config's list may name modules of another head class, so only a user's own list is checked.
            check_skip_patterns(model, config.skip_modules)
        # transformers' default list, as bitsandbytes uses it: the output embedding, tied weights, the last
        # parameter's name without ".weight" (a bias names no module, so skips nothing) and _keep_in_fp32_modules.
        self.modules_to_not_convert = sorted(
            self.get_modules_to_not_convert(model, config.skip_modules, keep_in_fp32_modules(model))
        )
        # LowBitConfig.head: the output head in a format of its own, never in the other layers' (a saved config's
        # skip_modules then leaves it out, so it is excluded here whatever the list says).
        head = output_head_name(model, None if self.pre_quantized else config.skip_modules) if config.head else None
        if head is not None:
            self.modules_to_not_convert = [name for name in self.modules_to_not_convert if name != head]
        replaced = replace_linear_modules(
            model, config.scheme, config.compute_dtype, self.modules_to_not_convert + ([head] if head else [])
        )
        if head is not None:
            replace_output_head(model, head, config.head_scheme, config.compute_dtype)
            replaced.append(head)
        if not replaced:
            raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D module to quantize outside skip_modules")
        if config.method is not None and not self.pre_quantized:
            self._prepare_calibration(model, device_map)
        register_if_peft_imported()  # a safety net: normally done at plugin import or when peft's __init__ runs
        # Checked here, on the swapped skeleton (so a quantized layer's tensors can be named), before anything loads.
        check_device_map(model, device_map)
        if self.pre_quantized:
            if not checkpoint_files:
                raise ValueError("a pre-quantized lowbit model loads from safetensors checkpoint files only")
            check_prequantized_checkpoint(model, checkpoint_files)
        elif config.skip_modules is None:
            # Record what was kept in full precision, so that the saved config reloads the very same layout.
            config.skip_modules = sorted(self.modules_to_not_convert)
        return model

    def _prepare_calibration(self, model, device_map) -> None:
        places = set(device_map.values()) if isinstance(device_map, dict) else set()
        if places & {"disk", "meta"}:
            raise ValueError(f"LowBitConfig.method={self.quantization_config.method!r} runs the model on calibration data "
                             "while it loads, which a device_map offloading to disk does not allow: quantize, save, "
                             "then load the saved model with the device_map")  # fmt: skip
        prefix, blocks = calibrated.decoder_blocks(model)
        self.calibrated_layers = {f"{prefix}.{name}" if prefix else name for name, module in blocks.named_modules()
                                  if isinstance(module, LowBitLinear)}  # fmt: skip
        self.stash = calibrated.WeightStash()

    def _calibrate(self, model) -> None:
        """method="gptq": the decoder blocks quantized one at a time (calibrated.py), then the stash removed."""
        from transformers.utils import logging

        config = self.quantization_config
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            bar = bar or logging.tqdm(total=total, desc="GPTQ: blocks")
            bar.update(done - bar.n)

        # Static activations are calibrated afterwards (_calibrate_activations): meanwhile their layers run in 16 bits.
        uncalibrated = static_layers(model).values()
        for layer in uncalibrated:
            layer.observer = _ignore
        try:
            ids = calibration_ids(config.dataset, config.tokenizer, config.calibration_samples, config.calibration_length)
            settings = gptq.GPTQSettings(damp=config.damp, act_order=config.act_order)
            summary = calibrated.quantize_blocks(model, self.stash, ids, settings, progress=progress)
        finally:
            for layer in uncalibrated:
                layer.observer = None
            if bar is not None:
                bar.close()
            self.stash.close()
            self.stash = None
        self.calibration = config.calibration_record() | summary

    def _calibrate_activations(self, model) -> None:
        """Static activations: their input scales (and SmoothQuant) from the config's dataset (activation_scales.py)."""
        config = self.quantization_config
        summary = calibrate(model, config.dataset, config.tokenizer, config.calibration_samples, config.calibration_length)
        record = {"activations": config.activations, "smoothing_alpha": config.smoothing_alpha,
                  "activation_layers": summary["layers"]}  # fmt: skip
        self.calibration = (self.calibration or config.calibration_record()) | record

    def get_state_dict_and_metadata(self, model):
        # the calibrated method's record, in every shard's safetensors header (config.json stays a plain LowBitConfig)
        if self.calibration is None:
            return None, {}
        return None, {METADATA_KEY: json.dumps(self.calibration)}

    def _process_model_after_weight_loading(self, model, **kwargs):
        # The loader makes float tensors it sets trainable; the stored tensors of a quantized layer never are.
        for module in model.modules():
            if isinstance(module, LowBitLinear):
                module.requires_grad_(False)
        if self.stash is not None:
            self._calibrate(model)
        if self.quantization_config.dataset is not None and not self.pre_quantized and static_layers(model):
            self._calibrate_activations(model)
        if self.pre_quantized:
            upgrade_layout(model, self.quantization_config)
        else:
            # transformers' disk-offload index points a weight quantized while loading at its 16-bit source tensor.
            repack_offloaded_weights(model, self.get_quantize_ops())
        placements = {(m.fmt.name, t.device) for m in model.modules() if isinstance(m, LowBitLinear)
                      for t in m.quantized_tensors().values()}  # fmt: skip
        self._layer_devices = {device.type for _, device in placements}
        for format_name, device in placements:
            ops.prepare(format_name, device)  # kernels ready before a first forward, which torch.compile may trace
        # The head kept in 16-bit is the largest weight of a decode step: it runs on the kept layers' kernels.
        KeptLinear.keep(model.get_output_embeddings())
        place_on_huge_pages(model)  # what each decode step streams, on 2 MB pages (huge_pages.py)
        # transformers has no model-card hook for quantizers: pushes of this model add our section to the card.
        attach_model_card(model, self.quantization_config)
        attach_parameter_count(model)  # num_parameters() counts weights, not packed bytes (parameter_count.py)
        return model

    def dequantize(self, model, dtype=None):
        # Default to the dtype the model was loaded in (config.dtype: the source checkpoint's, or the dtype asked of
        # from_pretrained), as transformers does for every quantizer: the rest of the model is already in it, and a
        # bf16 checkpoint quantized and dequantized comes back bf16 whatever the compute dtype.
        dtype = dtype or model.config.dtype or self.quantization_config.compute_dtype
        if isinstance(dtype, str):  # a reloaded checkpoint's config can hold its dtype's name ("bfloat16")
            dtype = getattr(torch, dtype)
        return super().dequantize(model, dtype=dtype)

    def _dequantize(self, model, dtype=None):
        dequantize_modules(model, dtype)
        for module in model.modules():
            KeptLinear.release(module)
        detach_model_card(model, self.quantization_config)
        detach_parameter_count(model)
        # One dtype for all parameters, so that the dequantized layers and the rest run together. Not model.to(dtype):
        # buffers keep their dtype (transformers holds the rotary inv_freq in float32 whatever the model dtype).
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        return model

    def is_serializable(self):
        return True

    @property
    def is_compileable(self) -> bool:
        # generate() compiles the forward (static cache) only where this is true. The kernels of the CPU backend and
        # the Triton launchers are custom ops that torch.compile keeps whole (cpu/library.py, kernels/library.py).
        # Offloaded layers (their tensors on the meta device, brought in by accelerate's hooks) are not compiled.
        return bool(self._layer_devices) and self._layer_devices <= {"cpu", "cuda"}

    @property
    def is_trainable(self) -> bool:
        # Adapters (LoRA) train on top of the frozen quantized layers: gradients flow to their inputs.
        return True
