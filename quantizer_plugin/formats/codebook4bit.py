"""4-bit codebook formats (NF4, FP4): blockwise absmax scaling, 16-value code look-up, two codes per byte.

The layout and numerics are those of bitsandbytes' `quantize_4bit`/`dequantize_4bit`, so that our packed codes
and dequantized weights equal theirs exactly:
- the weight is flattened row-major and cut into blocks of `block_size` elements (a block may span rows; the
  last block may be short), each scaled by its absmax into [-1, 1];
- each scaled value takes the code whose value is nearest (ties to the lower value), two codes per byte with
  the first element in the high nibble;
- with double quantization the float32 absmax vector is centred on its mean and stored as 8-bit dynamic codes
  in blocks of 256 (see dynamic8bit.py).

Stored tensors of a layer with n = out_features * in_features weights and b = ceil(n / block_size) blocks
(format_version 2; version 1 stored `weight` and `weight_absmax_code` 1-D and the offset 0-d, see base.py):
  weight               uint8   (ceil(n / 2), 1) packed codes (bitsandbytes' Params4bit shape)
  weight_absmax        float32 (b,)             without double quant
  weight_absmax_code   uint8   (b, 1)           with double quant: the absmax, 8-bit coded around its mean
  weight_absmax_scale  float32 (ceil(b / 256),) with double quant: absmax of each 256-block of centred absmax
  weight_absmax_offset float32 (1,)             with double quant: the mean that was subtracted
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .base import QuantScheme, TensorSpec, WeightFormat, cdiv, refuse_non_finite
from .dynamic8bit import DOUBLE_QUANT_BLOCK, dynamic_code, quantize_dynamic
from .records import CodebookWeight


# Elements quantized at a time (a multiple of every block size, and even, so chunks pack independently).
_CHUNK_ELEMENTS = 1 << 22


class Codebook4BitFormat(WeightFormat):
    bits = 4
    family = CodebookWeight.family
    settings = {None: {"block_size": 64, "double_quant": True}, "q8_0": {"block_size": 64, "double_quant": True}}

    def __init__(self, name: str, code: torch.Tensor):
        if code.shape != (16,) or code.dtype != torch.float32:
            raise ValueError(f"a 4-bit codebook holds 16 float32 values, got {tuple(code.shape)} {code.dtype}")
        self.name = name
        self._code = code

    def code(self, device: torch.device | str = "cpu") -> torch.Tensor:
        device = torch.device(device)
        return self._code if device.type == "cpu" else self._device_code(device)

    @lru_cache(maxsize=None)
    def _device_code(self, device: torch.device) -> torch.Tensor:
        return self._code.to(device)  # kept there once, so that a forward makes no host-to-device copy

    @lru_cache(maxsize=None)
    def bounds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Rounding to the nearest code = bucketizing against the midpoints of the sorted code; `order` maps a
        # position in the sorted code back to the code's index (NF4 is sorted already, FP4 is in bit order).
        code = self.code(device)
        order = torch.argsort(code)
        midpoints = (code[order[:-1]] + code[order[1:]]) / 2
        return midpoints, order.to(torch.uint8)

    def tensor_specs(self, out_features: int, in_features: int, scheme: QuantScheme) -> dict[str, TensorSpec]:
        n = out_features * in_features
        n_blocks = cdiv(n, scheme.block_size)
        column = () if scheme.format_version < 2 else (1,)  # see FORMAT_VERSION
        specs = {"weight": TensorSpec((cdiv(n, 2), *column), torch.uint8)}
        if scheme.double_quant:
            specs["weight_absmax_code"] = TensorSpec((n_blocks, *column), torch.uint8)
            specs["weight_absmax_scale"] = TensorSpec((cdiv(n_blocks, DOUBLE_QUANT_BLOCK),), torch.float32)
            specs["weight_absmax_offset"] = TensorSpec(column, torch.float32)
        else:
            specs["weight_absmax"] = TensorSpec((n_blocks,), torch.float32)
        return specs

    def quantize(self, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        if not weight.is_floating_point():
            raise TypeError(f"{self.name} quantizes float weights, got {weight.dtype}")
        refuse_non_finite(weight)
        codes, absmax = self.quantize_codes(weight.reshape(-1), scheme.block_size)
        return self.stored_tensors(codes, absmax, weight, scheme)

    def stored_tensors(
        self, codes: torch.Tensor, absmax: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme
    ) -> dict[str, torch.Tensor]:
        """The layer's stored tensors from `weight`'s packed codes and float32 block absmax (double-quantized here
        if the scheme asks). A faster backend's quantizer (ops.quantize) computes the codes and absmax itself."""
        tensors = {"weight": codes}
        if scheme.double_quant:
            offset = absmax.mean()
            absmax_code, absmax_scale = quantize_dynamic(absmax - offset, DOUBLE_QUANT_BLOCK)
            tensors.update(weight_absmax_code=absmax_code, weight_absmax_scale=absmax_scale, weight_absmax_offset=offset)
        else:
            tensors["weight_absmax"] = absmax
        out_features, in_features = weight.reshape(-1, weight.shape[-1]).shape
        return self.conform(tensors, out_features, in_features, scheme)

    def quantize_codes(self, flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed uint8 codes and float32 per-block absmax of a 1-D float tensor.

        Works through the tensor in chunks of whole blocks so that the float32 temporaries stay a few tens of
        megabytes, whatever the size of the weight being loaded.
        """
        n = flat.numel()
        chunk = max(block_size, _CHUNK_ELEMENTS // block_size * block_size)
        codes, absmax = [], []
        for start in range(0, n, chunk):
            chunk_codes, chunk_absmax = self._quantize_chunk(flat[start : start + chunk], block_size)
            codes.append(chunk_codes)
            absmax.append(chunk_absmax)
        return torch.cat(codes), torch.cat(absmax)

    def _quantize_chunk(self, flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = flat.float()
        n = flat.numel()
        full = n - n % block_size
        blocks = flat[:full].view(-1, block_size)
        absmax = blocks.abs().amax(dim=1)
        # bitsandbytes multiplies full blocks by the reciprocal of their absmax but divides the short tail block;
        # the two differ in the last bit for some inputs, so we do the same to keep the codes identical.
        scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1)
        if full < n:
            tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
            absmax = torch.cat([absmax, tail_absmax[None]])
            scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
        del flat, blocks
        if n % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        midpoints, order = self.bounds(scaled.device)
        codes = order[torch.bucketize(scaled, midpoints, out_int32=True)]
        return (codes[0::2] << 4) | codes[1::2], absmax

    def record(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, scheme: QuantScheme):
        device = tensors["weight"].device
        common = dict(packed=tensors["weight"].reshape(-1), code=self.code(device))
        if not scheme.double_quant:
            return CodebookWeight(out_features, in_features, scheme.block_size, absmax=tensors["weight_absmax"], **common)
        return CodebookWeight(
            out_features, in_features, scheme.block_size, **common,
            absmax_code=tensors["weight_absmax_code"].reshape(-1), absmax_scale=tensors["weight_absmax_scale"],
            absmax_offset=tensors["weight_absmax_offset"].reshape(1), dynamic_code=dynamic_code(device),
        )  # fmt: skip
