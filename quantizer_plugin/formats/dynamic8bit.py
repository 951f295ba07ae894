"""The 8-bit dynamic code and the blockwise quantizer that double quantization applies to the 4-bit absmax.

Bit-for-bit the same as bitsandbytes' CPU `quantize_blockwise` (0.50): the signed dynamic map of
`create_dynamic_map()`; each block scaled by the reciprocal of its absmax; the nearest code found through a
65536-bin look-up table over [-1, 1] (bin centres rounded to the nearest code by the code's midpoints). The table
is a close approximation of exact nearest rounding; we use the very same one so that our codes equal theirs.
"""

from __future__ import annotations

from functools import lru_cache

import torch

DOUBLE_QUANT_BLOCK = 256
_LUT_BINS = 65536


def _build_dynamic_code() -> torch.Tensor:
    # Signed dynamic tree code with 7 exponent bits and 8 bits in all (Dettmers 2015): for each decade 10^-6..10^0,
    # 2^i linearly spaced fraction midpoints, mirrored for the sign, plus 0 and 1.
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-6 + i)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


@lru_cache(maxsize=None)
def _lookup_table_cpu() -> torch.Tensor:
    code = _dynamic_code_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    bin_centres = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32)) / (_LUT_BINS - 1)
    # the first code whose upper midpoint is not below the bin centre
    return torch.searchsorted(midpoints, bin_centres, side="left").to(torch.uint8)


# Built once at import: torch.compile then traces a constant tensor (building it calls .tolist(), a graph break).
_DYNAMIC_CODE = _build_dynamic_code()


def _dynamic_code_cpu() -> torch.Tensor:
    return _DYNAMIC_CODE


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry sorted code, float32."""
    device = torch.device(device)
    return _DYNAMIC_CODE if device.type == "cpu" else _device_dynamic_code(device)


@lru_cache(maxsize=None)
def _device_dynamic_code(device: torch.device) -> torch.Tensor:
    return _DYNAMIC_CODE.to(device)  # kept there once, so that a forward makes no host-to-device copy


def quantize_dynamic(values: torch.Tensor, block_size: int = DOUBLE_QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D float32 tensor blockwise to uint8 codes; returns (codes, per-block absmax)."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * block_size - n)).view(n_blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normed = (padded * inverse[:, None]).clamp(-1.0, 1.0)
    bins = (((normed + 1.0) * 0.5) * (_LUT_BINS - 1) + 0.5).to(torch.int64)
    codes = _lookup_table_cpu().to(flat.device)[bins]
    codes = torch.where(absmax[:, None] > 0, codes, torch.zeros_like(codes))  # an all-zero block codes as 0
    return codes.reshape(-1)[:n], absmax


def dequantize_dynamic(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = DOUBLE_QUANT_BLOCK) -> torch.Tensor:
    """Inverse of `quantize_dynamic`, float32."""
    values = dynamic_code(codes.device)[codes.reshape(-1).long()]
    block_of = torch.arange(values.numel(), device=codes.device) // block_size
    return values * absmax[block_of]
