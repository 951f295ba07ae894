"""A LowBitConfig passed to from_pretrained for a checkpoint that is already quantized by us.

transformers merges the two in `AutoHfQuantizer.merge_quantization_configs`: it keeps the checkpoint's config and
only warns that the one passed is ignored. So a user who asked for int8 on an nf4 checkpoint silently got nf4. We
wrap that one function, for lowbit checkpoints only:
- what the checkpoint stores (the format, its activations mode, block size, double quant, the head's format) cannot
  change on load, so a passed config that disagrees is an error naming the fields and both values;
- what only decides how the stored weights run (compute_dtype, LLM.int8's outlier_threshold) is taken from the passed
  config, as transformers does for the loading attributes of GPTQ or AWQ;
- which layers are quantized is the checkpoint's: skip_modules of the passed config does not apply to a saved model.
Any other checkpoint, or another config class, goes to transformers' own merge untouched.
"""

from __future__ import annotations

from .config import QUANT_METHOD, LowBitConfig
from .integrations.transformers import wrap_config_merge

STORED_FIELDS = ("weights", "activations", "double_quant", "block_size", "head", "smoothing_alpha")
LOADING_FIELDS = ("compute_dtype", "outlier_threshold")



def merged_config(saved: LowBitConfig, asked: LowBitConfig) -> LowBitConfig:
    """The checkpoint's config with the passed config's loading fields; an error if they disagree on storage."""
    disagreements = [
        f"{field}: the checkpoint has {getattr(saved, field)!r}, the config passed has {getattr(asked, field)!r}"
        for field in STORED_FIELDS
        if getattr(saved, field) != getattr(asked, field)
    ]
    if disagreements:
        raise ValueError(
            "the LowBitConfig passed to from_pretrained disagrees with the one this checkpoint was quantized with: "
            + "; ".join(disagreements) + ". A pre-quantized "
            "checkpoint loads in its own format: pass no quantization_config (or one that matches), or quantize the "
            "full-precision model again"
        )
    fields = saved.to_dict()
    for field in LOADING_FIELDS:
        if getattr(asked, field) is not None:  # None: the field does not apply to this format
            fields[field] = getattr(asked, field)
    return LowBitConfig.from_dict(fields)


def _merge(original, quantization_config, quantization_config_from_args):
    if isinstance(quantization_config_from_args, LowBitConfig):
        saved = quantization_config
        if isinstance(saved, dict) and saved.get("quant_method") == QUANT_METHOD:
            saved = LowBitConfig.from_dict(saved)
        if isinstance(saved, LowBitConfig):
            return merged_config(saved, quantization_config_from_args)
    return original(quantization_config, quantization_config_from_args)


def install() -> None:
    """Wraps transformers' merge once (a re-import of the plugin finds it wrapped)."""
    wrap_config_merge(_merge)
