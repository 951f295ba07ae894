"""The weights a decode step streams, moved onto transparent huge pages (Linux).

A decode step reads every quantized weight and the kept head once, hundreds of MB in 4 KB pages: each new page costs
a page walk, and the hardware prefetchers stop at every page boundary. Placed in one anonymous mapping that asks the
kernel for 2 MB pages (madvise(MADV_HUGEPAGE), which Linux honours where transparent huge pages are "always" or
"madvise", its usual default), the same weights need 512 times fewer translations. On the Xeon with AMX (2 threads),
an eager nf4 decode of the 0.4B Llama went from 32.5 to 28.7 ms per token; copied into such a mapping without the
advice, 30.7 and 31.4 (one process, 5 alternating runs; docs/kernels.md).

`place_on_huge_pages(model)` copies the parameters and buffers of the model's LowBitLinear layers and its kept head
(modules.KeptLinear) into one such mapping, each tensor its own storage in it (so that save_pretrained sees no
shared tensors), and swaps them in with `.data`, which keeps every Parameter object, its requires_grad, and the tying
of a head to the embedding. The quantizer calls it after loading; QUANTIZER_PLUGIN_HUGE_PAGES=0 turns it off. The
mapping lives as long as any tensor placed in it.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch
from torch import nn

HUGE_PAGES_ENV = "QUANTIZER_PLUGIN_HUGE_PAGES"
HUGE_PAGE_BYTES = 2 << 20
TENSOR_ALIGNMENT = 64  # each tensor starts on a cache line
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this process can ask for transparent huge pages: Linux with them set to "always" or "madvise" (the
    setting shows the active one in brackets), and not turned off by QUANTIZER_PLUGIN_HUGE_PAGES=0."""
    if os.environ.get(HUGE_PAGES_ENV, "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def streamed_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors of the model's LowBitLinear layers and kept head that can move: contiguous plain CPU tensors, each
    the only tensor of the model on its storage (two that share one, a head tied to the embedding through a view say,
    stay where they are; one Parameter in two modules counts once)."""
    from .modules import KeptLinear, LowBitLinear

    ours = {id(t) for m in model.modules() if isinstance(m, (LowBitLinear, KeptLinear)) for t in owned(m)}
    everything = {id(t): t for m in model.modules() for t in owned(m)}
    by_storage: dict[int, list[torch.Tensor]] = {}
    for tensor in everything.values():
        if tensor.device.type == "cpu" and tensor.numel() > 0:
            by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(tensor)
    return [
        tensors[0]
        for tensors in by_storage.values()
        if len(tensors) == 1 and id(tensors[0]) in ours and type(tensors[0].data) is torch.Tensor
        and tensors[0].is_contiguous()
    ]  # fmt: skip


def owned(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def place_on_huge_pages(model: nn.Module) -> int:
    """Move the model's streamed tensors (streamed_tensors) into one mapping advised for huge pages; returns the bytes
    moved (0 where huge pages are unavailable or there is nothing to move). The values are copied bit for bit."""
    if not huge_pages_available():
        return 0
    tensors = streamed_tensors(model)
    if not tensors:
        return 0
    offsets, size = [], 0
    for tensor in tensors:
        offsets.append(size)
        size += -(-tensor.nbytes // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT
    # an anonymous mapping starts on a 4 KB page, not a 2 MB one: one huge page more, so that the tensors can start
    # on a 2 MB boundary and fill whole huge pages
    mapping = mmap.mmap(-1, size + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first write, so that the first touch faults in huge pages
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE_BYTES
    for tensor, offset in zip(tensors, offsets):
        placed = torch.frombuffer(mapping, dtype=torch.uint8, count=tensor.nbytes, offset=start + offset)
        placed = placed.view(tensor.dtype).view(tensor.shape)
        placed.copy_(tensor)
        tensor.data = placed
    return size
