"""transformers' fine-grained FP8 checkpoints (quant_method "fp8", FineGrainedFP8Config: DeepSeek-V3-style and
transformers' own) into our fp8, losslessly, without a GPU.

transformers stores each quantized linear as `weight` float8 e4m3fn (out, in) and `weight_scale_inv` (the scale that
dequantizes: weight = fp8 * scale_inv) per block of block_m rows by block_n columns, (out / block_m, in / block_n),
float32, or a power of two as float8 e8m0 (scale_fmt "ue8m0") or as its exponent byte in uint8 (MXFP8). On a machine
without a recent GPU transformers dequantizes the whole model to 16 bits when it loads one. Our fp8 keeps a float32
scale per block of columns of each row, so a block of rows becomes its scale repeated on each of its rows:

| transformers' FP8 | ours (LowBitLinear, weights="fp8") |
|---|---|
| `weight` float8_e4m3fn (out, in) | `weight` uint8 (out, in): the same bytes |
| `weight_scale_inv` (out / block_m, in / block_n) | `weight_scale` float32 (out, in / block_n): row r takes block row r // block_m |
| one scale for the tensor (no block size, or a 1 x 1 grid) | one scale per row (block_size None), repeated |
| `activation_scale` / `input_scale` (static activations) | dropped with a warning: our fp8 multiplies 16-bit activations |

The block grid is read from each scale's shape, as transformers' dequantization reads it (the weight's dimensions must
be multiples of the grid's); every layer must end up with the same column block, which must be one LowBitConfig allows
(a power of two from 16 to 4096), or the tensor is named in an error. The layers transformers left unquantized (no
scale: `modules_to_not_convert`, shapes its quantizer skips) stay in 16 bits, named in `skip_modules`. e4m3fn's NaN
pattern in a weight, or e8m0's NaN exponent (255) in a scale, is an error naming the tensor, found while the output
is written (which leaves nothing behind).
"""

from __future__ import annotations

import warnings

import torch

from ..config import LowBitConfig
from .source import ConversionError, ConversionPlan

SCALE = "weight_scale_inv"
ACTIVATION_SCALES = ("activation_scale", "input_scale")
# the weight dtypes transformers' FP8 checkpoints hold (safetensors' names) and our format of each
FORMATS = {"F8_E4M3": "fp8", "F8_E5M2": "fp8_e5m2"}
# the bit patterns that are not finite numbers: e4m3fn's NaN; e5m2's infinities and NaNs
NON_FINITE = {"fp8": (0x7F, 0xFF), "fp8_e5m2": tuple(range(0x7C, 0x80)) + tuple(range(0xFC, 0x100))}
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0", "U8")


def import_checkpoint(plan: ConversionPlan, quantization: dict, shapes: dict[str, tuple[int, int]]) -> dict:
    """Rewrite `plan` (a fine-grained FP8 checkpoint) into our layout; returns our quantization config."""
    folder = plan.source.folder
    quantized = sorted(key.removesuffix("." + SCALE) for key in plan.keys() if key.endswith("." + SCALE))
    if not quantized:
        raise ConversionError(f"{folder}: no {SCALE} tensors: nothing is quantized")
    formats, blocks, whole_rows = {}, {}, {}
    for module in quantized:
        if module not in shapes:
            raise ConversionError(
                f"{plan.file_of(module)}: {module!r} is quantized but the model has no such linear layer "
                "(fused mixture-of-experts weights are not converted yet)"
            )
        formats[module], blocks[module] = _module_from_fp8(plan, module, shapes[module])
        whole_rows[module] = blocks[module] == shapes[module][1]  # one column block: the whole row
    _one_of(folder, "weight dtypes", formats)
    # A layer whose rows are one block fits any column block at least as long (ours then has one group per row).
    split = {module: block for module, block in blocks.items() if not whole_rows[module]}
    block = _one_of(folder, "column blocks", split) if split else None
    for module in quantized:
        if whole_rows[module] and block is not None and blocks[module] > block:
            raise ConversionError(f"{plan.file_of(module)}: {module!r} has one scale per row of {blocks[module]} "
                                  f"columns, the other layers one per {block}; one config cannot hold them")  # fmt: skip
    static = sorted(key for key in plan.source.headers if key.rsplit(".", 1)[-1] in ACTIVATION_SCALES)
    if static:
        warnings.warn(f"{folder}: its {len(static)} static activation scales ({static[0]}, ...) are dropped: the "
                      "converted fp8 layers multiply 16-bit activations (the weights convert losslessly)",
                      stacklevel=3)  # fmt: skip
    skip = [name for name in shapes if name not in quantized]
    try:
        config = LowBitConfig(weights=next(iter(formats.values())), block_size=block, compute_dtype="bfloat16",
                              skip_modules=skip)  # fmt: skip
    except ValueError as error:
        raise ConversionError(f"{folder}: the scales' column block {block} cannot be ours ({error})") from None
    return config.to_dict()


def _one_of(folder, what: str, values: dict):
    """The one value every layer has, or an error naming two layers that differ."""
    if len(set(values.values())) > 1:
        ordered = sorted(values, key=lambda module: str(values[module]))
        raise ConversionError(f"{folder}: its layers mix {what} ({ordered[0]}: {values[ordered[0]]}, {ordered[-1]}: "
                              f"{values[ordered[-1]]}); one config cannot hold them")  # fmt: skip
    return next(iter(values.values()))


def _module_from_fp8(plan: ConversionPlan, module: str, shape: tuple[int, int]) -> tuple[str, int]:
    """Plan module's tensors as ours; returns its format and the columns each of its scales covers."""
    out_features, in_features = shape
    weight = plan.checked(module, "weight", "fp8 weight", shape)
    if weight.dtype not in FORMATS:
        raise ConversionError(f"{weight.file}: tensor '{module}.weight' is {weight.dtype}, expected float8 "
                              f"e4m3fn (F8_E4M3) or e5m2 (F8_E5M2)")  # fmt: skip
    fmt = FORMATS[weight.dtype]
    scale = plan.checked(module, SCALE, "scale")
    key = f"{module}.{SCALE}"
    if scale.dtype not in SCALE_DTYPES:
        raise ConversionError(f"{scale.file}: tensor {key!r} is {scale.dtype}, expected one of {SCALE_DTYPES}")
    grid = scale.shape if len(scale.shape) == 2 else (1, 1) if all(n == 1 for n in scale.shape) else None
    if grid is None or out_features % grid[0] or in_features % grid[1]:
        raise ConversionError(f"{scale.file}: tensor {key!r} has shape {scale.shape}, not a grid of blocks that "
                              f"divides the weight's {shape}")  # fmt: skip
    block_rows, block_columns = out_features // grid[0], in_features // grid[1]
    shard = plan.source.shard_of(f"{module}.weight")
    load = plan.source.load
    scale_dtype = scale.dtype

    def weight_bytes() -> torch.Tensor:
        values = load(f"{module}.weight").view(torch.uint8)
        bad = torch.isin(values, torch.tensor(NON_FINITE[fmt], dtype=torch.uint8))
        if bool(bad.any()):
            row, column = (int(i) for i in bad.nonzero()[0])
            raise ConversionError(f"{weight.file}: tensor '{module}.weight' holds a NaN or an infinity at "
                                  f"({row}, {column})")  # fmt: skip
        return values

    def row_scales() -> torch.Tensor:
        grid_scales = load(key).reshape(grid)
        if scale_dtype == "U8":  # MXFP8: the exponent byte of a power of two
            if bool((grid_scales == 255).any()):
                raise ConversionError(f"{scale.file}: tensor {key!r} holds the NaN exponent 255")
            grid_scales = torch.ldexp(torch.ones(grid), grid_scales.to(torch.int32) - 127)
        values = grid_scales.float()
        if not bool(torch.isfinite(values).all()):
            raise ConversionError(f"{scale.file}: tensor {key!r} holds a NaN or an infinity")
        return values.repeat_interleave(block_rows, dim=0).contiguous()

    for name in [SCALE, *ACTIVATION_SCALES]:
        plan.drop(f"{module}.{name}")
    plan.put(f"{module}.weight", shard, weight_bytes)
    plan.put(f"{module}.weight_scale", shard, row_scales)
    return fmt, block_columns
