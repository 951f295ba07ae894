"""The one safetensors header reader: each tensor's name, shape and dtype, and the file that holds it, and the
header's string metadata, without reading any tensor's data (safetensors' own parser, which checks the header against
the file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

# safetensors' dtype names of the torch dtypes our layouts store
SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.float32: "F32"}  # fmt: skip
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()} | {"F64": torch.float64}


class UnreadableCheckpointError(ValueError):
    """A file that is not a readable safetensors file, or tensors held twice; the message names the file."""


@dataclass(frozen=True)
class TensorHeader:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "U8", "F32", ...
    file: Path

    def is_a(self, dtype: torch.dtype) -> bool:
        return self.dtype == SAFETENSORS_DTYPES.get(dtype)


def read_headers(files: list[str | Path]) -> dict[str, TensorHeader]:
    """Tensor name -> header, for every tensor of the files; a name held by two files is an error."""
    headers: dict[str, TensorHeader] = {}
    for file in map(Path, files):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key in headers:
                        raise UnreadableCheckpointError(f"{file}: tensor {key!r} is also in {headers[key].file.name}")
                    tensor_slice = handle.get_slice(key)
                    headers[key] = TensorHeader(tuple(tensor_slice.get_shape()), tensor_slice.get_dtype(), file)
        except UnreadableCheckpointError:
            raise
        except Exception as error:  # safetensors' own checks: a header that is not JSON, offsets past the file, ...
            raise UnreadableCheckpointError(f"{file}: not a readable safetensors file ({error})") from error
    return headers


def read_header(file: str | Path, key: str) -> TensorHeader:
    """The header of one tensor of one file."""
    with safe_open(str(file), framework="pt") as handle:
        tensor_slice = handle.get_slice(key)
        return TensorHeader(tuple(tensor_slice.get_shape()), tensor_slice.get_dtype(), Path(file))


def read_metadata(file: str | Path) -> dict[str, str]:
    """The header's `__metadata__` (string keys and values; empty where the file has none)."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        raise UnreadableCheckpointError(f"{file}: not a readable safetensors file ({error})") from error


def load_tensor(header_or_file: TensorHeader | str | Path, key: str) -> torch.Tensor:
    """One tensor's data, read from its file."""
    file = header_or_file.file if isinstance(header_or_file, TensorHeader) else header_or_file
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)
