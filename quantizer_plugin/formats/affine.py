"""Integer affine formats (int4, int3, int2): per-group asymmetric quantization along the input dimension.

Each group of `block_size` consecutive weights of a row has a scale s and a zero point z, and each weight a code
q in [0, 2^bits - 1]: w ~ (q - z) * s. A row whose in_features is not a multiple of the group ends on a short
group. The scales and zero points are fitted without calibration data (fit_groups below): HQQ's half-quadratic
steps on the zero point (Badri & Shaji 2023), then alternating least squares on both, each group keeping the
candidate with the smallest squared error of its weights, never worse than round-to-nearest on the min/max range.

Stored tensors (the checkpoint layout; groups = ceil(in_features / block_size)):
  weight        uint8   (out_features, row bytes)   int4/int2: ceil(in_features * bits / 8) bytes, 8 / bits codes per
                                                    byte, the first in the high bits. int3: 8 codes in 3 bytes, as
                                                    bit planes per run of 64 codes (records.affine_row_bytes)
  weight_scale  float16 (out_features, groups)      s
  weight_zero   float16 (out_features, groups)      z, in code units (need not be an integer)

int3 stores bit planes, not 3-bit fields across byte boundaries, so that a kernel turns each plane of 64 codes into
lane masks with a load, on any SIMD width, and takes the columns in their own order.
"""

from __future__ import annotations

import torch

from .base import QuantScheme, TensorSpec, WeightFormat, cdiv, refuse_non_finite
from .records import PLANE_RUN, AffineWeight, affine_row_bytes, unpack_codes

# Rows fitted at a time: the fit's float32 temporaries stay a few tens of megabytes whatever the weight's size.
_CHUNK_ELEMENTS = 1 << 21
# HQQ's proximal steps: the lp-norm of the error they shrink, its penalty and the penalty's growth per step.
_LP_NORM, _BETA, _KAPPA = 0.7, 10.0, 1.01
HQQ_STEPS = 5
LEAST_SQUARES_STEPS = 5  # more steps gained under 1% of squared error on random and outlier-laden weights
_TINY = torch.finfo(torch.float16).tiny  # smallest normal float16: a smaller scale would lose precision when stored


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
    return (w / scale + zero).round_().clamp_(0, top)


def _squared_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return ((q - zero) * scale - w).square_().sum(dim=1, keepdim=True)


def fit_groups(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 scale and zero point, each (groups, 1), for the float32 groups `w` (groups, size)."""
    top = 2**bits - 1
    low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    scale = ((high - low) / top).clamp_(min=_TINY).half().float()  # round-to-nearest's, as stored
    zero = -low / scale
    best_scale, best_zero = scale.half(), zero.half()
    best_error = torch.full_like(low, torch.inf)

    def keep_if_better(scale: torch.Tensor, zero: torch.Tensor) -> None:
        nonlocal best_error
        stored_scale, stored_zero = scale.clamp(_TINY, torch.finfo(torch.float16).max).half(), zero.half()
        s, z = stored_scale.float(), stored_zero.float()
        error = _squared_error(w, _codes(w, s, z, top), s, z)
        better = error < best_error  # NaN (a degenerate fit) is never better
        best_error = torch.where(better, error, best_error)
        best_scale.copy_(torch.where(better, stored_scale, best_scale))
        best_zero.copy_(torch.where(better, stored_zero, best_zero))

    keep_if_better(scale, zero)  # round-to-nearest: the candidate every later one must beat

    # HQQ: the zero point that best explains the codes once the error's outliers are shrunk away (lp, p < 1).
    beta = _BETA
    for _ in range(HQQ_STEPS):
        q = _codes(w, scale, zero, top)
        error = w - (q - zero) * scale
        shrunk = torch.sign(error) * torch.relu(error.abs() - error.abs().clamp(min=1e-12).pow(_LP_NORM - 1) / beta)
        zero = (q - (w - shrunk) / scale).mean(dim=1, keepdim=True)
        beta *= _KAPPA
        keep_if_better(scale, zero)

    # Least squares: for fixed codes, w ~ a * q + b has a closed-form best a (the scale) and b (-zero * scale);
    # for a fixed scale and zero, rounding gives the best codes. Alternating never raises the squared error.
    scale, zero = best_scale.float(), best_zero.float()
    for _ in range(LEAST_SQUARES_STEPS):
        q = _codes(w, scale, zero, top)
        q_centred = q - q.mean(dim=1, keepdim=True)
        w_centred = w - w.mean(dim=1, keepdim=True)
        slope = (q_centred * w_centred).sum(dim=1, keepdim=True) / q_centred.square().sum(dim=1, keepdim=True)
        fitted = slope > 0  # one code level, or a fit that inverts the codes: keep the previous scale
        scale = torch.where(fitted, slope, scale)
        zero = torch.where(fitted, q.mean(dim=1, keepdim=True) - w.mean(dim=1, keepdim=True) / scale, zero)
        keep_if_better(scale, zero)
    return best_scale, best_zero


class IntAffineFormat(WeightFormat):
    family = AffineWeight.family
    settings = {None: {"block_size": 64}, "q8_0": {"block_size": 64}}

    def __init__(self, name: str, bits: int):
        if bits not in (2, 3, 4):
            raise ValueError(f"{name}: the affine layouts hold 2, 3 or 4 bits per code, got {bits}")
        self.name, self.bits = name, bits
        if bits == 3:  # no q8_0 mode: the integer kernels multiply bytes of codes, and int3's are bit planes
            self.settings = {None: type(self).settings[None]}

    def tensor_specs(self, out_features: int, in_features: int, scheme: QuantScheme) -> dict[str, TensorSpec]:
        groups = cdiv(in_features, scheme.block_size)
        return {
            "weight": TensorSpec((out_features, affine_row_bytes(in_features, self.bits)), torch.uint8),
            "weight_scale": TensorSpec((out_features, groups), torch.float16),
            "weight_zero": TensorSpec((out_features, groups), torch.float16),
        }

    def quantize(self, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        if not weight.is_floating_point():
            raise TypeError(f"{self.name} quantizes float weights, got {weight.dtype}")
        refuse_non_finite(weight)
        weight = weight.reshape(-1, weight.shape[-1])
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // weight.shape[1])
        parts = [self._quantize_rows(weight[r : r + rows_per_chunk], scheme.block_size) for r in range(0, len(weight), rows_per_chunk)]
        return {name: torch.cat([part[name] for part in parts]) for name in ("weight", "weight_scale", "weight_zero")}

    def _quantize_rows(self, rows: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
        rows = rows.float()
        n, k = rows.shape
        full = k // block * block
        scales, zeros, codes = [], [], []
        # The full groups of every row, then the short last group of every row (when k is not a multiple).
        for part, size in ((rows[:, :full], block), (rows[:, full:], k - full)):
            if size == 0 or part.shape[1] == 0:
                continue
            groups = part.reshape(-1, size)
            scale, zero = fit_groups(groups, self.bits)
            codes.append(_codes(groups, scale.float(), zero.float(), 2**self.bits - 1).reshape(n, -1))
            scales.append(scale.reshape(n, -1))
            zeros.append(zero.reshape(n, -1))
        return {"weight": self.pack(torch.cat(codes, dim=1)), "weight_scale": torch.cat(scales, dim=1), "weight_zero": torch.cat(zeros, dim=1)}

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """(rows, k) codes as each row's bytes (records.affine_row_bytes); padding bits zero."""
        if self.bits == 3:
            return _pack_planes(codes.to(torch.uint8))
        per_byte = 8 // self.bits
        n, k = codes.shape
        codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, cdiv(k, per_byte) * per_byte - k))
        codes = codes.reshape(n, -1, per_byte)
        packed = torch.zeros(codes.shape[:2], dtype=torch.uint8, device=codes.device)
        for j in range(per_byte):
            packed |= codes[..., j] << (8 - self.bits * (j + 1))
        return packed

    def unpack(self, packed: torch.Tensor, in_features: int) -> torch.Tensor:
        """The (rows, in_features) uint8 codes of `pack`'s bytes."""
        return unpack_codes(packed, self.bits, in_features)

    def record(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, scheme: QuantScheme):
        return AffineWeight(
            out_features, in_features, scheme.block_size, self.bits,
            packed=tensors["weight"], scale=tensors["weight_scale"], zero=tensors["weight_zero"],
        )  # fmt: skip


def _planes_of(codes: torch.Tensor) -> torch.Tensor:
    """(..., 8 m) codes as (..., 3, m) bytes: plane p holds bit p of each code, column 8 i + b in bit b of byte i."""
    bits = codes.unflatten(-1, (-1, 8))  # (..., m, 8)
    weight = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return torch.stack([(((bits >> p) & 1) * weight).sum(-1, dtype=torch.uint8) for p in range(3)], dim=-2)


def _pack_planes(codes: torch.Tensor) -> torch.Tensor:
    """int3's bytes (records.affine_row_bytes): each run of 64 codes as three 8-byte planes, a short last run as three
    planes of ceil(r / 8) bytes."""
    n, k = codes.shape
    runs = k // PLANE_RUN
    parts = [_planes_of(codes[:, : runs * PLANE_RUN].reshape(n, runs, PLANE_RUN)).reshape(n, -1)]
    tail = k - runs * PLANE_RUN
    if tail:
        padded = torch.nn.functional.pad(codes[:, runs * PLANE_RUN :], (0, cdiv(tail, 8) * 8 - tail))
        parts.append(_planes_of(padded).reshape(n, -1))
    return torch.cat(parts, dim=1)
