"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
for one linear layer: the weight's rounding errors pushed onto the columns not yet rounded, weighted by the
Hessian of the layer's squared output error, H = 2 X X^T over its calibration inputs X.

The grid (each group's scale and integer zero point, or each row's int8 scale) is fixed from the weight before any
column is rounded ("static groups"), so the stored layout is the format's plain one and every kernel serves the
result. With act-order the columns are rounded in decreasing order of diag(H) (the inputs with the most energy
first, while the most columns remain to absorb their errors), each still with its own group's scale and zero point.
Columns go in blocks of `block_columns` with lazy batch updates of the rest; H^-1 comes from a Cholesky factor of
the damped H (damping: a fraction of H's mean diagonal added to it). Once the codes are chosen, each row's group
scales are re-fitted to its output error by least squares (AffineGrid.refit_scales); codes and zero points stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import QuantScheme, WeightFormat
from .formats.affine import IntAffineFormat
from .formats.base import refuse_non_finite
from .formats.int8 import Int8RowwiseFormat
from .formats.records import INT8_MAX

# GPTQModel's defaults
DAMP = 0.01
BLOCK_COLUMNS = 128


@dataclass(frozen=True)
class GPTQSettings:
    damp: float = DAMP
    block_columns: int = BLOCK_COLUMNS
    act_order: bool = True

    def __post_init__(self):
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 1):
            raise ValueError(f"GPTQ damping must be a number in (0, 1), got {self.damp!r}")
        if not (isinstance(self.block_columns, int) and self.block_columns > 0):
            raise ValueError(f"GPTQ block_columns must be a positive integer, got {self.block_columns!r}")


def supports(fmt: WeightFormat) -> bool:
    """Whether GPTQ can fill this format's layout: the integer affine formats and int8."""
    return isinstance(fmt, (IntAffineFormat, Int8RowwiseFormat))


class Hessian:
    """H = 2 X^T X / n over every input row x a layer saw (the mean keeps its scale independent of n), in float32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        total = self.rows + x.shape[0]
        self.matrix.mul_(self.rows / total)
        self.matrix.addmm_(x.T, x, alpha=2.0 / total)
        self.rows = total


class AffineGrid:
    """int4/int3/int2's grid: each group's float16 scale and integer zero point, fixed from the weight before any
    column is rounded (GPTQ's static groups: the groups stay the format's consecutive columns whatever order the
    columns are rounded in), and the rounding of a column onto its group's grid.

    The grid is GPTQ's asymmetric min/max over the group, widened to hold zero. (Measured on the small LM of
    tests/tiny_lm.py: a grid search that shrinks the range to lower the rounding error alone, GPTQ's "mse" option,
    raised the KL divergence at 2 bits by two thirds: the error feedback then carries the clipped weights' errors.)"""

    def __init__(self, fmt: IntAffineFormat, weight: torch.Tensor, block: int):
        self.fmt, self.block, self.top = fmt, block, 2**fmt.bits - 1
        n, k = weight.shape
        groups = -(-k // block)
        low = torch.stack([weight[:, g * block : (g + 1) * block].amin(dim=1) for g in range(groups)], dim=1)
        high = torch.stack([weight[:, g * block : (g + 1) * block].amax(dim=1) for g in range(groups)], dim=1)
        low, high = low.clamp(max=0), high.clamp(min=0)
        flat = (low == 0) & (high == 0)
        low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
        self.scale = ((high - low) / self.top).clamp(min=torch.finfo(torch.float16).tiny).half()
        self.zero = (-low / self.scale.float()).round().clamp(0, self.top).half()
        # the columns' grid as rows (groups, N): the column loop reads one group's scales as a contiguous vector
        self._scale_rows, self._zero_rows = self.scale.float().T.contiguous(), self.zero.float().T.contiguous()

    def round(self, w: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = self._scale_rows[column // self.block], self._zero_rows[column // self.block]
        codes = (w / s + z).round_().clamp_(0, self.top)
        return codes, (codes - z) * s  # the reference's dequantize: (q - z) * s in float32

    def refit_scales(self, weight: torch.Tensor, codes: torch.Tensor, hessian: torch.Tensor, damp: float) -> None:
        """Once every column is rounded: each row's group scales re-fitted, codes and integer zero points kept, to the
        row's output error (w - w_q)^T H (w - w_q) (H damped as for the column loop), which GPTQ chose the codes for
        but the min/max scales were not.
        w_q = D s is linear in the row's scales s (D: each group's offsets d_g = q - z in its own column), so the
        least-squares scales solve (D^T H D) s = D^T H w, a system of one equation per group. A row keeps its
        fitted scales only where its error, float16 rounding included, is lower.

        Measured on the small LM of tests/tiny_lm.py (both seeds, int4/int3/int2, groups 64 and 128): the KL
        divergence from the float model fell in 10 of the 12 cases (by 1 to 8% at int2, 2 to 6% at int3) and rose
        at int4 for seed 0 (3% and 5%). Without the damping the fit follows the calibration inputs too closely: a
        random Llama calibrated on 256 tokens (tests/test_gptq.py) lost twice as much as with it."""
        n, k = weight.shape
        h = hessian.float().clone()  # damped as GPTQ's is: directions the calibration inputs never took still count
        h.diagonal().add_(damp * h.diagonal().mean())
        groups = self.scale.shape[1]
        offsets = codes - self.zero.float().repeat_interleave(self.block, dim=1)[:, :k]
        group_of = torch.arange(k) // self.block
        gram = torch.empty(n, groups, groups)  # D^T H D per row
        moment = torch.empty(n, groups)  # D^T H w per row
        for g in range(groups):
            columns = slice(g * self.block, min(k, (g + 1) * self.block))
            reach = offsets[:, columns] @ h[columns]  # (n, k): d_g^T H_g,: for every row
            moment[:, g] = (reach * weight).sum(dim=1)
            gram[:, g] = torch.zeros(n, groups).index_add_(1, group_of, reach * offsets)  # d_g^T H_g,j d_j per group j
        del reach
        solution, info = torch.linalg.solve_ex(gram, moment)
        solvable = (info == 0) & torch.isfinite(solution).all(dim=1)
        fitted = torch.where(solvable[:, None], solution, self.scale.float())
        fitted = fitted.clamp(min=torch.finfo(torch.float16).tiny, max=torch.finfo(torch.float16).max).half()

        def output_error(scale: torch.Tensor) -> torch.Tensor:  # the row's error less w^T H w, which both share
            s = scale.double()  # float64: the two errors differ by far less than their terms
            return (s.unsqueeze(1) @ gram.double() @ s.unsqueeze(2)).flatten() - 2 * (s * moment.double()).sum(dim=1)

        lower = output_error(fitted) < output_error(self.scale)
        self.scale = torch.where(lower[:, None], fitted, self.scale)

    def stored(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": self.fmt.pack(codes.to(torch.uint8)), "weight_scale": self.scale.contiguous(),
                "weight_zero": self.zero.contiguous()}  # fmt: skip


class Int8Grid:
    """int8's layout: each row's absmax as its scale (the format's own, fixed from the weight), codes rounded
    symmetrically onto it."""

    def __init__(self, weight: torch.Tensor):
        self.absmax = weight.abs().amax(dim=1)
        self.step = self.absmax / INT8_MAX  # the reference's dequantize: values * (scale / 127)
        self.divisor = self.step.clamp(min=torch.finfo(torch.float32).tiny)  # a zero row stays zero

    def round(self, w: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes = (w / self.divisor).round().clamp(-INT8_MAX, INT8_MAX)
        return codes, codes * self.step

    def stored(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": codes.to(torch.int8), "weight_scale": self.absmax.float()}


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U, raising the damping (x10, three
    times) if the damped H is still not positive definite in float32.

    U comes from one Cholesky factor and one triangular inverse, without forming H^-1: with J the reversal
    permutation and J H J = L L^T (L lower), H^-1 = (J L^-T J)(J L^-1 J), and J L^-1 J is upper triangular with a
    positive diagonal, so it is H^-1's upper Cholesky factor, with neither H^-1 nor a second factorization formed."""
    mean_diagonal = hessian.diagonal().mean()
    for attempt in range(4):
        damped = hessian.flip(0, 1).contiguous()
        damped.diagonal().add_(damp * 10**attempt * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped  # (K, K) float32 temporaries are freed as soon as they are used: 32 MB each at K = 2816
        if info == 0:
            inverse = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
            inverse = torch.linalg.solve_triangular(lower, inverse, upper=False)
            del lower
            if bool(torch.isfinite(inverse).all()):
                return inverse.flip(0, 1).contiguous()
    raise ValueError("GPTQ: the layer's Hessian is not positive definite even with damping 1000x; are its "
                     "calibration inputs all zero or non-finite?")  # fmt: skip


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, grid, settings: GPTQSettings = GPTQSettings()) -> torch.Tensor:
    """The codes (N, K), in the original column order, that GPTQ rounds `weight` to on `grid` (AffineGrid or
    Int8Grid).

    The loop works on the transposed weight (K, N), in the order the columns are rounded: each column is a
    contiguous row, and the error feedback is an in-place rank-1 update (addr_) within a block of columns and one
    matrix product (addmm_) onto the columns after it."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"GPTQ: the Hessian is {tuple(hessian.shape)}, the weight has {k} input columns")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("GPTQ: the Hessian holds NaN or infinite values (non-finite calibration activations)")
    diagonal = hessian.diagonal().float()
    dead = diagonal == 0  # an input that was always zero: its column cannot matter, round it as it is
    diagonal = diagonal.masked_fill(dead, 1.0)
    order = torch.argsort(diagonal, descending=True, stable=True) if settings.act_order else torch.arange(k)
    h = hessian.float()[order][:, order]
    h[dead[order], dead[order]] = 1.0
    inverse = inverse_hessian_factor(h, settings.damp)
    del h
    columns = weight.float().T[order].contiguous()  # row i: the weight's column order[i]
    codes = torch.empty(k, n, dtype=torch.float32)
    original_column = order.tolist()
    for first in range(0, k, settings.block_columns):
        last = min(first + settings.block_columns, k)
        block_inverse = inverse[first:last, first:last]
        errors = torch.empty(last - first, n, dtype=torch.float32)
        for i in range(last - first):
            column = columns[first + i]
            codes[first + i], q = grid.round(column, original_column[first + i])
            error = errors[i]
            torch.sub(column, q, out=error).div_(block_inverse[i, i])
            columns[first + i + 1 : last].addr_(block_inverse[i, i + 1 :], error, alpha=-1)
        columns[last:].addmm_(inverse[first:last, last:].T, errors, alpha=-1)
    unpermuted = torch.empty_like(codes)
    unpermuted[order] = codes
    return unpermuted.T.contiguous()


def quantize(fmt: WeightFormat, weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme,
             settings: GPTQSettings = GPTQSettings()) -> dict[str, torch.Tensor]:  # fmt: skip
    """`weight` (N, K) in `fmt`'s stored tensors, rounded by GPTQ against `hessian` (K, K)."""
    if not supports(fmt):
        raise ValueError(f"method='gptq' fills the integer formats (int8, int4, int3, int2), not weights={fmt.name!r}")
    refuse_non_finite(weight)
    weight = weight.float()
    grid = Int8Grid(weight) if isinstance(fmt, Int8RowwiseFormat) else AffineGrid(fmt, weight, scheme.block_size)
    codes = gptq_codes(weight, hessian, grid, settings)
    if isinstance(grid, AffineGrid):
        grid.refit_scales(weight, codes, hessian, settings.damp)
    return grid.stored(codes)
