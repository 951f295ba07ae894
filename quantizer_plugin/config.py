"""LowBitConfig: what the user asked for, validated on construction, stored in config.json as a versioned dict."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import FORMAT_VERSION, QuantScheme, format_names, get_format
from .formats.activations import STATIC_MODES

QUANT_METHOD = "lowbit"
# FORMAT_VERSION (formats/base.py) is the on-disk layout version. A checkpoint written by a newer layout is refused;
# an older one loads and is brought to the current layout (serialization.upgrade_layout).

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_FIELDS = (
    "weights", "activations", "double_quant", "block_size", "compute_dtype", "outlier_threshold", "skip_modules", "head",
    "smoothing_alpha",
)


def _resolve_compute_dtype(value: Any) -> torch.dtype:
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"LowBitConfig.compute_dtype: {value!r} is not a torch dtype name")
        value = dtype
    if not isinstance(value, torch.dtype):
        raise TypeError(f"LowBitConfig.compute_dtype must be a torch.dtype or its name, got {type(value).__name__}")
    if value not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"LowBitConfig.compute_dtype must be float16, bfloat16 or float32, got {value}")
    return value


METHODS = ("gptq",)  # calibrated methods; None is the data-free fit of each format
# GPTQModel's group size, the default of block_size under method="gptq" (the data-free fits default to 64)
GPTQ_BLOCK_SIZE = 128


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LowBitConfig.{field} must be a positive integer, got {value!r}")
    return value


# The fields a format's settings may name (WeightFormat.settings); which apply depends on weights and activations.
FORMAT_SETTINGS = ("double_quant", "block_size", "outlier_threshold", "smoothing_alpha")
_UNSET = object()  # LowBitConfig(activations=...) not given: the format's default (None is a value: 16-bit)


def _check_setting(field: str, value: Any) -> Any:
    """A format setting's value, validated (the defaults pass too)."""
    if field == "double_quant" and not isinstance(value, bool):
        raise TypeError(f"LowBitConfig.double_quant must be a bool, got {value!r}")
    if field == "block_size" and (
        isinstance(value, bool) or not isinstance(value, int) or not (16 <= value <= 4096 and value & (value - 1) == 0)
    ):
        raise ValueError(f"LowBitConfig.block_size must be a power of two from 16 to 4096, got {value!r}")
    if field == "smoothing_alpha":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"LowBitConfig.smoothing_alpha must be a number from 0 to 1 (or None: no smoothing), "
                             f"got {value!r}")  # fmt: skip
        value = float(value)
    if field == "outlier_threshold":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"LowBitConfig.outlier_threshold must be a number >= 0, got {value!r}")
        value = float(value)
    return value


class LowBitConfig(QuantizationConfigMixin):
    """Quantization settings for `from_pretrained(..., quantization_config=LowBitConfig(...))`.

    Args:
        weights: "nf4", "fp4" (4-bit codebooks, bitsandbytes-compatible), "int4", "int3", "int2" (per-group affine
            integers, scales and zero points optimised without calibration data), "int8" (LLM.int8, or
            weight-only with activations=None), "fp8" (8-bit floats, e4m3fn) or "fp8_e5m2" (e5m2), both with
            16-bit activations.
        activations: None (16-bit activations: weight-only quantization; the default except for weights="int8"),
            "int8" (LLM.int8's int8 activations, per token; the default for weights="int8", and only there; with
            outlier_threshold=0, plain dynamic per-token int8), "int8_static" (weights="int8") or "fp8_static"
            (weights="fp8"/"fp8_e5m2"): W8A8, the activations on one grid per layer whose step (input_scale) a
            calibration pass records, from `dataset` while loading or by quantizer_plugin.calibrate(model, ...)
            afterwards (quantizer_plugin/activation_scales.py); or "q8_0"
            (nf4/fp4/int4/int2: each activation row rounded to int8 in blocks of 32, as llama.cpp does, so that the
            CPU multiplies bytes by the weight's codes; a codebook is rounded to int8 steps too. Fastest decode on
            CPUs without AVX512-BF16, at a small accuracy cost: docs/kernels.md).
        double_quant: nf4/fp4 only (default True): store the per-block absmax as 8-bit codes around their mean.
        block_size: nf4/fp4/int4/int3/int2 (default 64): elements per absmax block or per affine group, a power of two
            from 16 to 4096. fp8 (default None: one scale per row): the columns of a row that share a scale.
        compute_dtype: dtype of the matmul (default bfloat16); a torch.dtype or its name.
        outlier_threshold: LLM.int8 only (default 6.0): activation columns with any |x| >= it are multiplied in
            16-bit; 0 turns the decomposition off.
        smoothing_alpha: static activations only (default 0.5 for int8_static, None for fp8_static, where it did
            not help on the small LM: benchmarks/RESULTS.md): SmoothQuant's migration strength, the input
            channels' factors max|x|^alpha / max|w|^(1 - alpha) from the calibration data, folded into the norm
            before the layer where there is one and into the layer's input otherwise; None: no smoothing.
        skip_modules: module names (or patterns) kept in full precision. Default: the output embedding, tied
            weights and the last module, as transformers' bitsandbytes integration does.
        head: None (default: the output head stays in 16-bit, as bitsandbytes keeps it) or a weight format for it,
            e.g. "int8" or "int4": the head is the largest single weight a decode step reads. It takes the
            format's weight-only mode (activations="q8_0" when this config has it and the format offers it) and
            this config's block_size and double_quant where they apply. A head tied to the input embeddings is
            refused (quantizing both as one weight is not built yet).
        method: None (default: each format's fit without data) or "gptq": int8/int4/int3/int2 rounded by GPTQ on
            the activations of `dataset`, decoder block by decoder block while the model loads (quantizer_plugin/
            calibrated.py); block_size then defaults to 128, as GPTQModel's group. The calibration settings below are
            not saved in config.json (the checkpoint reloads as any other); the method and its calibration are
            recorded in the checkpoint's safetensors metadata instead.
        dataset: the calibration data of method="gptq" or of static activations: a list of strings (with
            `tokenizer`), a tensor of token ids, or "pydoc" (Python's documentation topics, shipped with every Python;
            with `tokenizer`).
        tokenizer: a tokenizer, or its name or path, for a dataset of text.
        calibration_samples, calibration_length: the number of calibration sequences (default 128) and their
            tokens (default 512).
        damp: GPTQ's damping, a fraction of the Hessian's mean diagonal (default 0.01).
        act_order: GPTQ rounds the columns in decreasing order of their inputs' energy (default True).
    """

    def __init__(
        self,
        weights: str = "nf4",
        double_quant: bool | None = None,
        block_size: int | None = None,
        compute_dtype: torch.dtype | str = torch.bfloat16,
        outlier_threshold: float | None = None,
        skip_modules: list[str] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        activations: str | None = _UNSET,
        head: str | None = None,
        method: str | None = None,
        dataset=None,
        tokenizer=None,
        calibration_samples: int = 128,
        calibration_length: int = 512,
        damp: float = 0.01,
        act_order: bool = True,
        smoothing_alpha: float | None = _UNSET,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LowBitConfig.quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if not isinstance(format_version, int) or format_version < 1:
            raise ValueError(f"LowBitConfig.format_version must be a positive integer, got {format_version!r}")
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"LowBitConfig.format_version is {format_version}, newer than the layout this quantizer_plugin knows "
                f"({FORMAT_VERSION}); upgrade quantizer_plugin to load this checkpoint"
            )
        if weights not in format_names():
            raise ValueError(f"LowBitConfig.weights: unknown format {weights!r}; expected one of {format_names()}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.weights = weights

        modes = get_format(weights).settings  # activations mode -> the settings that apply, with their defaults
        if activations is _UNSET:
            activations = get_format(weights).default_activations
        if activations not in modes:
            raise ValueError(
                f"LowBitConfig.activations: weights={weights!r} takes activations in {list(modes)}, got {activations!r}"
            )
        self.activations = activations
        self._set_calibration(method, dataset, tokenizer, calibration_samples, calibration_length, damp, act_order)
        if method == "gptq" and block_size is None and "block_size" in modes[activations]:
            block_size = GPTQ_BLOCK_SIZE
        # smoothing_alpha=None turns SmoothQuant off: not given is the format's default (_UNSET)
        explicit_none = {"smoothing_alpha"} if smoothing_alpha is None else set()
        smoothing_alpha = None if smoothing_alpha is _UNSET else smoothing_alpha
        given = dict(zip(FORMAT_SETTINGS, (double_quant, block_size, outlier_threshold, smoothing_alpha)))
        applicable = modes[activations]
        for field, value in given.items():
            if field in applicable:
                value = applicable[field] if value is None and field not in explicit_none else value
                if value is not None:  # None is a default of its own where a format has it (fp8: a scale per row)
                    value = _check_setting(field, value)
            elif value is not None:
                raise ValueError(
                    f"LowBitConfig.{field} does not apply to weights={weights!r} with activations={activations!r}"
                )
            setattr(self, field, value)
        if method == "gptq" and activations in STATIC_MODES and self.smoothing_alpha is not None:
            raise ValueError("LowBitConfig.smoothing_alpha: SmoothQuant rescales the weights after GPTQ has rounded "
                             "them, which would undo its fit; pass smoothing_alpha=None with method='gptq'")  # fmt: skip
        self.compute_dtype = _resolve_compute_dtype(compute_dtype)
        if skip_modules is not None:
            if isinstance(skip_modules, str) or not all(isinstance(name, str) for name in skip_modules):
                raise TypeError(f"LowBitConfig.skip_modules must be a list of module names, got {skip_modules!r}")
            skip_modules = list(skip_modules)
        self.skip_modules = skip_modules
        if head is not None and head not in format_names():
            raise ValueError(f"LowBitConfig.head: unknown format {head!r}; expected None or one of {format_names()}")
        self.head = head

    def _set_calibration(self, method, dataset, tokenizer, samples, length, damp, act_order) -> None:
        """Validate and keep the calibrated method's settings (none of them is saved in config.json)."""
        if method is not None and method not in METHODS:
            raise ValueError(f"LowBitConfig.method: expected None or one of {list(METHODS)}, got {method!r}")
        static = self.activations in STATIC_MODES
        if method is None and dataset is not None and not static:
            raise ValueError("LowBitConfig.dataset is given but nothing calibrates: pass method='gptq', or static "
                             "activations (activations='int8_static' or 'fp8_static')")  # fmt: skip
        if dataset is not None:
            text = isinstance(dataset, str) or (isinstance(dataset, (list, tuple)) and all(isinstance(t, str) for t in dataset))
            if text and tokenizer is None:
                raise ValueError("LowBitConfig.tokenizer: a dataset of text needs a tokenizer (an object or its name)")
        if method == "gptq":
            from .gptq import GPTQSettings, supports

            if not supports(get_format(self.weights)):
                raise ValueError(f"LowBitConfig.method='gptq' fills the integer formats (int8, int4, int3, int2), "
                                 f"not weights={self.weights!r}")  # fmt: skip
            if dataset is None:
                raise ValueError("LowBitConfig.dataset: method='gptq' needs calibration data (texts, token ids or "
                                 "'pydoc')")  # fmt: skip
            if not isinstance(act_order, bool):
                raise TypeError(f"LowBitConfig.act_order must be a bool, got {act_order!r}")
            try:
                GPTQSettings(damp=damp, act_order=act_order)
            except ValueError as error:
                raise ValueError(f"LowBitConfig.damp: {error}") from None
        self.method, self.dataset, self.tokenizer = method, dataset, tokenizer
        self.calibration_samples = _positive_int("calibration_samples", samples)
        self.calibration_length = _positive_int("calibration_length", length)
        self.damp, self.act_order = damp, act_order

    def calibration_record(self) -> dict[str, Any] | None:
        """What the checkpoint's metadata records of a calibrated method (None for the data-free fits)."""
        if self.dataset is None:
            return None
        dataset = self.dataset if isinstance(self.dataset, str) else type(self.dataset).__name__
        record = {"method": self.method, "dataset": dataset, "samples": self.calibration_samples,
                  "length": self.calibration_length}  # fmt: skip
        return record | ({"damp": self.damp, "act_order": self.act_order} if self.method == "gptq" else {})

    @property
    def scheme(self) -> QuantScheme:
        """The per-layer settings the formats need."""
        applicable = get_format(self.weights).settings[self.activations]
        settings = {field: getattr(self, field) for field in applicable}
        return QuantScheme(self.weights, **settings, activations=self.activations, format_version=self.format_version)

    @property
    def head_scheme(self) -> QuantScheme | None:
        """The output head's settings when `head` names a format: its weight-only mode, or q8_0 activations where this
        config uses them and the head's format offers them; block_size and double_quant from this config where they
        apply to both, else the head format's defaults."""
        if self.head is None:
            return None
        modes = get_format(self.head).settings
        mode = "q8_0" if self.activations == "q8_0" and "q8_0" in modes else None
        settings = {field: getattr(self, field) if getattr(self, field) is not None else default
                    for field, default in modes[mode].items()}  # fmt: skip
        return QuantScheme(self.head, **settings, activations=mode, format_version=self.format_version)

    # --- serialization -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "weights": self.weights,
            "activations": self.activations,
            "double_quant": self.double_quant,
            "block_size": self.block_size,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "outlier_threshold": self.outlier_threshold,
            "skip_modules": None if self.skip_modules is None else list(self.skip_modules),
            # written only when set, so that a config without it stays readable by versions that predate the field
            **({"head": self.head} if self.head is not None else {}),
            **({"smoothing_alpha": self.smoothing_alpha} if self.activations in STATIC_MODES else {}),
        }

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other) -> bool:
        return isinstance(other, LowBitConfig) and self.to_dict() == other.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        config_dict = dict(config_dict)
        # The version decides which fields exist, so it is checked before anything else.
        version = config_dict.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            cls(format_version=version)  # raises the "newer format" error
        unknown = set(config_dict) - set(_FIELDS) - {"quant_method", "format_version"}
        if unknown:
            raise ValueError(f"LowBitConfig: unknown fields {sorted(unknown)}")
        config = cls(**config_dict)
        unused = {key: value for key, value in kwargs.items() if key not in _FIELDS}
        if any(key in _FIELDS for key in kwargs):
            # over the fields the dict gave, not the defaults they implied (which another format may refuse)
            merged = config_dict | {key: value for key, value in kwargs.items() if key in _FIELDS}
            config = cls(**merged)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_preset(cls, name: str) -> LowBitConfig:
        """A preset from quantizer_plugin/configs by name, e.g. "nf4", "int4", "int8-weight-only"."""
        return cls.from_dict(preset_fields(name))

    @classmethod
    def from_bnb(cls, bnb_config) -> LowBitConfig:
        """Map a transformers BitsAndBytesConfig onto ours (same numerics for 4-bit; LLM.int8 for 8-bit)."""
        skip = bnb_config.llm_int8_skip_modules
        if bnb_config.load_in_4bit:
            if bnb_config.bnb_4bit_quant_storage not in (None, torch.uint8):
                raise ValueError(
                    f"BitsAndBytesConfig.bnb_4bit_quant_storage={bnb_config.bnb_4bit_quant_storage} is not supported; "
                    "lowbit stores packed codes as uint8"
                )
            return cls(
                weights=bnb_config.bnb_4bit_quant_type,
                double_quant=bool(bnb_config.bnb_4bit_use_double_quant),
                block_size=64,  # bitsandbytes' Linear4bit block size
                compute_dtype=bnb_config.bnb_4bit_compute_dtype or torch.float32,
                skip_modules=skip,
            )
        if bnb_config.load_in_8bit:
            if bnb_config.llm_int8_has_fp16_weight:
                raise ValueError("BitsAndBytesConfig.llm_int8_has_fp16_weight=True (16-bit master weights) is not supported")
            # bitsandbytes multiplies LLM.int8 activations in float16
            return cls(weights="int8", outlier_threshold=bnb_config.llm_int8_threshold, compute_dtype=torch.float16, skip_modules=skip)
        raise ValueError("BitsAndBytesConfig sets neither load_in_4bit nor load_in_8bit: nothing to map")


def preset_names() -> list[str]:
    folder = resources.files("quantizer_plugin.configs")
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def preset_fields(name: str) -> dict[str, Any]:
    """The fields a preset sets (the others take their defaults), e.g. to override some before building a config."""
    available = preset_names()
    if name not in available:
        raise ValueError(f"unknown preset {name!r}; available presets: {available}")
    return json.loads(resources.files("quantizer_plugin.configs").joinpath(f"{name}.json").read_text())
