"""Oracles for the tests, written apart from quantizer_plugin's own code paths.

- The weights a layer's stored tensors stand for, element by element: element i of the flattened weight is
  codebook[its 4-bit code] * absmax[i // block_size], the codebooks and the 8-bit dynamic code taken from
  bitsandbytes (a test-only dependency), the nibbles unpacked with integer arithmetic; int8 is codes * row_absmax / 127;
  int4/int2 are (code - zero) * scale of the element's group, the codes unpacked with integer arithmetic; fp8 is the
  value of each byte's bit pattern by the OCP fp8 specification's formula times its group's scale.
- LLM.int8's product written out in float64 from its definition (Dettmers et al. 2022, as bitsandbytes computes it):
  a column of x holding any |x| >= threshold is multiplied in floating point against the dequantized weight column;
  every other column goes through per-row int8 codes of x, whose row absmax skips the outlier entries.
Nothing here imports quantizer_plugin.formats or calls a layer's dequantize.
"""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import torch

DOUBLE_QUANT_BLOCK = 256  # bitsandbytes' nested (double-quant) block


def codebook(weights: str) -> torch.Tensor:
    return bnb_functional.get_4bit_type(weights, device="cpu").float()


def block_absmax(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 absmax of every block, decoding double quantization when the layer uses it."""
    if "weight_absmax" in stored:
        return stored["weight_absmax"].float().reshape(-1)
    codes = stored["weight_absmax_code"].reshape(-1).long()
    scales = stored["weight_absmax_scale"].float().repeat_interleave(DOUBLE_QUANT_BLOCK)[: codes.numel()]
    offset = stored["weight_absmax_offset"].float().reshape(-1)[0]
    return bnb_functional.create_dynamic_map(signed=True).float()[codes] * scales + offset


def dequantize_4bit(stored: dict[str, torch.Tensor], out_features: int, in_features: int, weights: str,
                    block_size: int, codebook_dtype: torch.dtype = torch.float32,
                    int8_steps: bool = False) -> torch.Tensor:  # fmt: skip
    """Each code's codebook entry (rounded to `codebook_dtype` first: the bfloat16 decode kernels read it so; or with
    `int8_steps` to round(127 c) / 127, as q8_0 activations multiply it, llama.cpp's IQ4_NL's int8 codebook) times
    its block's absmax, in float32."""
    packed = stored["weight"].reshape(-1).long()
    n = out_features * in_features
    codes = torch.empty(2 * packed.numel(), dtype=torch.long)
    codes[0::2], codes[1::2] = packed // 16, packed % 16  # the first element of a pair sits in the high nibble
    absmax = block_absmax(stored).repeat_interleave(block_size)[:n]
    values = codebook(weights).to(codebook_dtype).float()
    if int8_steps:
        values = torch.round(values * 127) / 127
    return (values[codes[:n]] * absmax).reshape(out_features, in_features)


def dequantize_int8(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    return stored["weight"].float() * (stored["weight_scale"].float() / 127.0)[:, None]


def dequantize_affine(stored: dict[str, torch.Tensor], in_features: int, bits: int, block_size: int) -> torch.Tensor:
    """Element (r, c) = (code - zero[r, c // block]) * scale[r, c // block]. int4/int2: the code of column c is the
    bits (c % per_byte) from the top of byte c // per_byte of row r. int3: column c is code j = c % 64 of run
    c // 64, whose 24 bytes (fewer in a row's short last run: ceil(r / 8) bytes a plane) hold three planes one after
    another; bit p of the code is bit j % 8 of byte j // 8 of plane p."""
    columns = torch.arange(in_features)
    if bits == 3:
        run, j = columns // 64, columns % 64
        whole_runs, tail = in_features // 64, in_features % 64
        plane_bytes = torch.where(run < whole_runs, 8, (tail + 7) // 8)
        codes = 0
        for plane in range(3):
            byte = stored["weight"].long()[:, run * 24 + plane * plane_bytes + j // 8]
            codes = codes + ((byte // 2 ** (j % 8)) % 2) * 2**plane
    else:
        per_byte = 8 // bits
        packed = stored["weight"].long()[:, columns // per_byte]
        shift = 8 - bits * (columns % per_byte + 1)
        codes = (packed // 2**shift) % 2**bits
    group = columns // block_size
    return (codes - stored["weight_zero"].float()[:, group]) * stored["weight_scale"].float()[:, group]


AFFINE_BITS = {"int4": 4, "int3": 3, "int2": 2}
# fp8 formats: exponent bits (the byte's other bits: a sign bit, then the exponent, then the mantissa)
FLOAT8_EXPONENT_BITS = {"fp8": 4, "fp8_e5m2": 5}


def float8_value(byte: torch.Tensor, exponent_bits: int) -> torch.Tensor:
    """The float64 value of each fp8 bit pattern, from the OCP 8-bit floating point specification (e4m3fn and
    e5m2): sign bit s, exponent field e, mantissa field m of M = 7 - exponent_bits bits, bias 2^(E - 1) - 1;
    (-1)^s 2^(1 - bias) m / 2^M for e = 0, else (-1)^s 2^(e - bias) (1 + m / 2^M). The non-finite patterns (e4m3fn:
    S.1111.111; e5m2: e = 31) are NaN or, e5m2's with m = 0, infinities (a quantizer must never write them)."""
    byte = byte.long()
    mantissa_bits = 7 - exponent_bits
    bias = 2 ** (exponent_bits - 1) - 1
    sign = torch.where(byte >= 128, -1.0, 1.0).double()
    e = (byte % 128) // 2**mantissa_bits
    m = (byte % 2**mantissa_bits).double()
    value = torch.where(e == 0, 2.0 ** (1 - bias) * m / 2**mantissa_bits,
                        2.0 ** (e - bias).double() * (1 + m / 2**mantissa_bits))  # fmt: skip
    top = e == 2**exponent_bits - 1
    if exponent_bits == 4:
        return torch.where(top & (m == 2**mantissa_bits - 1), torch.nan, sign * value)
    return torch.where(top, torch.where(m == 0, sign * torch.inf, torch.nan), sign * value)


def dequantize_float8(stored: dict[str, torch.Tensor], in_features: int, exponent_bits: int,
                      block_size: int | None) -> torch.Tensor:  # fmt: skip
    """Element (r, c) = fp8 value of byte (r, c) * scale[r, c // block] (block: the whole row when None), float32."""
    group = torch.arange(in_features) // (block_size or in_features)
    return (float8_value(stored["weight"], exponent_bits) * stored["weight_scale"].double()[:, group]).float()


def weight_of(layer) -> torch.Tensor:
    """The float32 (out_features, in_features) weight a quantized layer's stored tensors stand for (on CPU)."""
    stored = {name: tensor.detach().cpu() for name, tensor in layer.quantized_tensors().items()}
    if layer.scheme.weights == "int8":
        return dequantize_int8(stored)
    if layer.scheme.weights in FLOAT8_EXPONENT_BITS:
        return dequantize_float8(stored, layer.in_features, FLOAT8_EXPONENT_BITS[layer.scheme.weights],
                                 layer.scheme.block_size)  # fmt: skip
    if layer.scheme.weights in AFFINE_BITS:
        return dequantize_affine(stored, layer.in_features, AFFINE_BITS[layer.scheme.weights], layer.scheme.block_size)
    return dequantize_4bit(stored, layer.out_features, layer.in_features, layer.scheme.weights, layer.scheme.block_size)


def llm_int8_linear(x: torch.Tensor, weight_codes: torch.Tensor, weight_absmax: torch.Tensor,
                    threshold: float) -> torch.Tensor:  # fmt: skip
    """LLM.int8 x @ W.T in float64, for x (M, K) already in the compute dtype; no bias, no final rounding."""
    x = x.double().cpu()
    w = weight_codes.double().cpu() * (weight_absmax.double().cpu() / 127.0)[:, None]
    outlier_entries = x.abs() >= threshold if threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
    outlier_columns = outlier_entries.any(dim=0)
    inliers = torch.where(outlier_entries, 0.0, x)
    row_absmax = inliers.abs().amax(dim=1, keepdim=True)
    # the codes as float32 rounds them (half to even), from the float32 scale factor
    scaled = inliers.float() * (127.0 / row_absmax.float().clamp(min=torch.finfo(torch.float32).tiny))
    x_codes = torch.round(scaled).clamp(-127, 127).double()
    x_codes[:, outlier_columns] = 0.0
    int8_part = (x_codes @ weight_codes.double().cpu().T) * (row_absmax / 127.0) * (weight_absmax.double().cpu() / 127.0)
    return int8_part + x[:, outlier_columns] @ w[:, outlier_columns].T
