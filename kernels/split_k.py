"""Split-K for the weight-streaming (decode) kernels: several programs share one output tile, each reducing a slice
of K, so that a layer with few output tiles still has enough programs to keep every SM streaming weight.

The partial sums are reduced in one launch and in a fixed order: each program writes its float32 partial tile to a
workspace, then increments the tile's arrival counter; the program that arrives last reads the SPLIT_K partials back
in split order, sums them and runs the epilogue. The result is therefore deterministic (no float atomics), and the
last program resets its counter to zero, so the counters are zeroed once per (device, stream) and reused by every
launch after that, CUDA-graph replays included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Arrival counters per (device, stream): kernels on one stream run one after another, so they can share them.
_COUNTERS: dict[tuple, torch.Tensor] = {}


@triton.jit
def k_slice(K, split, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[start, end) of the K range reduced by split `split`: whole BLOCK_K tiles, so tile offsets stay aligned."""
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    start = split * per_split
    return start, tl.minimum(start + per_split, K)


@triton.jit
def reduce_splits(partial, mask, tile, split, offsets, M, N, workspace_ptr, counter_ptr, SPLIT_K: tl.constexpr):
    """(the sum over splits of this output tile's float32 partial, the tile's store mask).

    `mask` and `offsets` (row * N + column) are the tile's in-bounds mask and output offsets, `tile` numbers it
    among the launch's output tiles and `split` is this program's split. With SPLIT_K > 1 only the program that
    arrives last holds the sum, and the returned mask is empty in the others.
    """
    total = partial
    if SPLIT_K > 1:
        tl.store(workspace_ptr + split * M * N + offsets, partial, mask=mask)
        # Every thread's partial is written before the one atomic that publishes it (release at GPU scope).
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(partial)
            for s in tl.static_range(SPLIT_K):
                # .cg: read at L2, where the other programs' writes are, never from a stale L1 line
                total += tl.load(workspace_ptr + s * M * N + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(counter_ptr + tile, 0)  # ready for the next launch on this stream
        # compared as a tile: the interpreter's scalar comparison of an atomic's result is int32, which no mask takes
        mask = mask & (offsets * 0 + arrived == SPLIT_K - 1)
    return total, mask


def buffers(configs: list[dict], m: int, n: int, device: torch.device, block_m: int | None = None) -> tuple:
    """(workspace, counters) for an (m, n) output launched at any of `configs` (tile sizes in each config's
    BLOCK_M and BLOCK_N, or `block_m` for a launcher that sets BLOCK_M itself): room for SPLIT_K float32 partials
    of the output, never read before it is written, and an arrival counter per output tile. Empty placeholders,
    never dereferenced, when no config splits K."""
    split_k = max(c["SPLIT_K"] for c in configs)
    if split_k == 1:
        placeholder = torch.empty(0, dtype=torch.int32, device=device)
        return placeholder, placeholder
    tiles = max(triton.cdiv(m, block_m or c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]) for c in configs)
    return torch.empty((split_k, m, n), dtype=torch.float32, device=device), counters(tiles, device)


def counters(tiles: int, device: torch.device) -> torch.Tensor:
    """At least `tiles` zeroed arrival counters for launches on the current stream of `device`."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < tiles:
        buffer = torch.zeros(triton.next_power_of_2(max(tiles, 1024)), dtype=torch.int32, device=device)
        _COUNTERS[key] = buffer
    return buffer
