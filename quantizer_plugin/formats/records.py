"""Typed records of a quantized layer's weight, one per family of formats: what every kernel is handed.

A family is a stored layout and its arithmetic. The formats of one family differ only in constants that the record
carries (a codebook, a bit width), so a kernel written for a family serves every format of it, and a new format of an
existing family (another 16-value codebook, int3 as affine) reaches every kernel with no new registration. A format
builds its layer's record from the stored tensors (WeightFormat.record); the kernels read the record's named fields,
never the layer, and the record's `dequantize` is the family's plain-torch arithmetic, the oracle of every kernel.

Adding a family: a record class here (its tensors and settings as fields, its `dequantize`), registered with
`@weight_family`; a format file whose `record` builds it; and a kernel per backend registered under the family's name
(quantizer_plugin.ops.register_kernel). docs/kernels.md walks through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from .dynamic8bit import DOUBLE_QUANT_BLOCK, dequantize_dynamic

INT8_MAX = 127.0

_FAMILIES: dict[str, type] = {}


def weight_family(cls):
    """Register a record class under its `family` name (the kernels' registry key, and the custom ops' argument)."""
    if cls.family in _FAMILIES:
        raise ValueError(f"weight family {cls.family!r} is already registered")
    _FAMILIES[cls.family] = cls
    return cls


@weight_family
@dataclass(eq=False)
class CodebookWeight:
    """4-bit codebook weights (NF4, FP4, any 16-value code), bitsandbytes' layout: the (out, in) weight flattened
    row-major, two codes per byte (the first element in the high nibble), one absmax per `block_size` consecutive
    elements (a block may span rows). Element e is code[c_e] * absmax[e // block_size]. With double quantization the
    absmax is itself stored as 8-bit dynamic codes: dynamic_code[absmax_code[b]] * absmax_scale[b // 256] +
    absmax_offset."""

    family: ClassVar[str] = "codebook4bit"
    bits: ClassVar[int] = 4
    dtypes: ClassVar[dict] = dict(packed=torch.uint8, code=torch.float32, absmax=torch.float32, absmax_code=torch.uint8,
                                  absmax_scale=torch.float32, absmax_offset=torch.float32, dynamic_code=torch.float32)
    out_features: int
    in_features: int
    block_size: int
    packed: torch.Tensor  # uint8 (ceil(n / 2),)
    code: torch.Tensor  # float32 (16,): the value of each 4-bit code
    absmax: torch.Tensor | None = None  # float32 (blocks,), without double quantization
    absmax_code: torch.Tensor | None = None  # uint8 (blocks,), with it
    absmax_scale: torch.Tensor | None = None  # float32 (ceil(blocks / 256),)
    absmax_offset: torch.Tensor | None = None  # float32 (1,)
    dynamic_code: torch.Tensor | None = None  # float32 (256,): the values of the 8-bit dynamic code

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block, undoing double quantization."""
        if not self.double_quant:
            return self.absmax
        centred = dequantize_dynamic(self.absmax_code, self.absmax_scale, DOUBLE_QUANT_BLOCK)
        return centred + self.absmax_offset.reshape(())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        n = self.out_features * self.in_features
        codes = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).reshape(-1)[:n]
        block_of = torch.arange(n, device=codes.device) // self.block_size
        values = self.code[codes.long()] * self.block_absmax()[block_of]
        return values.view(self.out_features, self.in_features).to(dtype)


@weight_family
@dataclass(eq=False)
class AffineWeight:
    """Per-group affine integer weights (int4, int3, int2): each row in its own affine_row_bytes(in, bits) bytes
    (int4/int2: 8 / bits codes per byte, the first in the high bits; int3: bit planes), and a float16 scale s and
    zero point z per group of `block_size` columns of a row (the last group of a row may be short). Element (r, c)
    is (q - z) * s of its group."""

    family: ClassVar[str] = "affine"
    dtypes: ClassVar[dict] = dict(packed=torch.uint8, scale=torch.float16, zero=torch.float16)
    out_features: int
    in_features: int
    block_size: int
    bits: int
    packed: torch.Tensor  # uint8 (out, affine_row_bytes(in, bits))
    scale: torch.Tensor  # float16 (out, groups)
    zero: torch.Tensor  # float16 (out, groups), in code units (need not be an integer)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        block, groups = self.block_size, self.scale.shape[1]
        codes = unpack_codes(self.packed, self.bits, self.in_features).float()
        codes = torch.nn.functional.pad(codes, (0, groups * block - self.in_features))
        codes = codes.view(self.out_features, groups, block)
        weight = (codes - self.zero.float()[..., None]) * self.scale.float()[..., None]
        return weight.view(self.out_features, -1)[:, : self.in_features].to(dtype)


# int3's bit planes (see affine_row_bytes): a run of 64 codes, each of its three planes 8 bytes.
PLANE_RUN = 64


def affine_row_bytes(in_features: int, bits: int) -> int:
    """The bytes of one row of an affine weight. int4/int2: ceil(in * bits / 8), 8 / bits codes per byte, the first
    in the high bits. int3: runs of 64 codes in 24 bytes (8 codes in 3 bytes), three bit planes of 8 bytes each,
    plane p holding bit p of every code of the run, code j's in bit j % 8 of byte j // 8 (the low bit first); a row's
    last r < 64 codes as the same three planes of ceil(r / 8) bytes."""
    if bits == 3:
        tail = in_features % PLANE_RUN
        return in_features // PLANE_RUN * 3 * (PLANE_RUN // 8) + 3 * (-(-tail // 8))
    return -(-in_features * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The (rows, in_features) uint8 codes of rows laid out as affine_row_bytes describes."""
    if bits == 3:
        return _unpack_planes(packed, in_features)
    shifts = [8 - bits * (j + 1) for j in range(8 // bits)]
    codes = torch.stack([(packed >> shift) & (2**bits - 1) for shift in shifts], dim=-1)
    return codes.reshape(packed.shape[0], -1)[:, :in_features]


def _plane_bits(planes: torch.Tensor) -> torch.Tensor:
    """(..., 3, bytes) bit planes as (..., bytes * 8) codes: bit b of byte i is column 8 i + b, plane p bit p."""
    bit = torch.arange(8, device=planes.device, dtype=torch.uint8)
    bits = (planes[..., None] >> bit) & 1  # (..., 3, bytes, 8)
    codes = bits[..., 0, :, :] | (bits[..., 1, :, :] << 1) | (bits[..., 2, :, :] << 2)
    return codes.flatten(-2)


def _unpack_planes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    rows, runs = packed.shape[0], in_features // PLANE_RUN
    run_bytes = 3 * (PLANE_RUN // 8)
    parts = [_plane_bits(packed[:, : runs * run_bytes].reshape(rows, runs, 3, PLANE_RUN // 8)).reshape(rows, -1)]
    tail = in_features - runs * PLANE_RUN
    if tail:
        parts.append(_plane_bits(packed[:, runs * run_bytes :].reshape(rows, 3, -1))[:, :tail])
    return torch.cat(parts, dim=1)


@weight_family
@dataclass(eq=False)
class RowScaledWeight:
    """Row-scaled 8-bit integer weights (LLM.int8's and weight-only int8's): element (r, c) is
    values[r, c] * scale[r] / 127, scale being the row's absmax (bitsandbytes' SCB)."""

    family: ClassVar[str] = "rowscaled8"
    bits: ClassVar[int] = 8
    dtypes: ClassVar[dict] = dict(values=torch.int8, scale=torch.float32)
    out_features: int
    in_features: int
    values: torch.Tensor  # int8 (out, in)
    scale: torch.Tensor  # float32 (out,)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.values.float() * (self.scale / INT8_MAX)[:, None]).to(dtype)


# The torch dtype of the fp8 encoding with this many exponent bits (the rest of the byte: a sign and the mantissa).
FLOAT8_DTYPES = {4: torch.float8_e4m3fn, 5: torch.float8_e5m2}


@weight_family
@dataclass(eq=False)
class Float8Weight:
    """fp8 weights (fp8, fp8_e5m2): each element's byte an fp8 bit pattern (exponent_bits 4: e4m3fn, 5: e5m2), and a
    float32 scale per `block_size` columns of a row (block_size = in_features: one per row; the last group of a row
    may be short). Element (r, c) is fp8_value(values[r, c]) * scale[r, c // block_size]."""

    family: ClassVar[str] = "float8"
    bits: ClassVar[int] = 8
    dtypes: ClassVar[dict] = dict(values=torch.uint8, scale=torch.float32)
    out_features: int
    in_features: int
    block_size: int
    exponent_bits: int
    values: torch.Tensor  # uint8 (out, in): the fp8 bit patterns
    scale: torch.Tensor  # float32 (out, groups)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        values = self.values.view(FLOAT8_DTYPES[self.exponent_bits]).float()
        scale = self.scale.repeat_interleave(self.block_size, dim=1)[:, : self.in_features]
        return (values * scale).to(dtype)


WeightRecord = Union[CodebookWeight, AffineWeight, RowScaledWeight, Float8Weight]


def weight_families() -> list[str]:
    return sorted(_FAMILIES)


def check_record(record, device: torch.device) -> None:
    """Raise a ValueError naming the first tensor of `record` that is not contiguous, in its family's dtype, on
    `device` (what a kernel given raw pointers relies on)."""
    for name, dtype in record.dtypes.items():
        tensor = getattr(record, name)
        if tensor is None:
            continue
        if tensor.dtype != dtype or tensor.device != device or not tensor.is_contiguous():
            raise ValueError(
                f"the {record.family} weight's {name!r} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} "
                f"(contiguous={tensor.is_contiguous()}), expected a contiguous {dtype} tensor on {device}"
            )


def _is_tensor_field(field: dataclasses.Field) -> bool:
    return "Tensor" in str(field.type)


def op_arguments(record) -> tuple[str, list[torch.Tensor | None], list[int]]:
    """The record as arguments a torch custom op's schema can hold: its family, its tensor fields in order (None where
    absent) and its integer settings in order (see `from_op_arguments`)."""
    fields = dataclasses.fields(record)
    tensors = [getattr(record, f.name) for f in fields if _is_tensor_field(f)]
    settings = [getattr(record, f.name) for f in fields if not _is_tensor_field(f)]
    return record.family, tensors, settings


def from_op_arguments(family: str, tensors: list[torch.Tensor | None], settings: list[int]):
    """The record that `op_arguments` took apart."""
    cls = _FAMILIES[family]
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields if _is_tensor_field(f)], [f.name for f in fields if not _is_tensor_field(f)]
    return cls(**dict(zip(names[0], tensors)), **dict(zip(names[1], settings)))
