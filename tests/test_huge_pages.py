"""The weights a decode step streams sit on transparent huge pages after loading (huge_pages.py).

What a user relies on: after from_pretrained, the quantized layers' tensors and the kept head are in memory the kernel
was asked to back with 2 MB pages (read back from the kernel's own account, /proc/self/smaps), and it did so for a
model large enough to fill one; the model computes exactly what it computes without them, saves and reloads, keeps
a tied head tied; QUANTIZER_PLUGIN_HUGE_PAGES=0 leaves the weights where the loader put them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from quantizer_plugin import LowBitConfig, LowBitLinear
from quantizer_plugin.huge_pages import HUGE_PAGES_ENV, streamed_tensors
from quantizer_plugin.modules import KeptLinear

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not THP.exists() or not any(f"[{mode}]" in THP.read_text() for mode in ("always", "madvise")),
    reason="this kernel offers no transparent huge pages (Linux only, and not set to 'never')",
)


def mapping_of(address: int) -> dict:
    """The kernel's account of the mapping holding `address` (/proc/self/smaps): its range, VmFlags and the kB of it
    backed by anonymous huge pages."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            current = {"start": start, "end": end, "flags": set(), "huge_kb": 0} if start <= address < end else None
        elif current is not None and head == "VmFlags:":
            current["flags"] = set(line.split()[1:])
            return current
        elif current is not None and head == "AnonHugePages:":
            current["huge_kb"] = int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def save_llama(folder: Path, hidden: int = 64, intermediate: int = 128, tie: bool = False) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tie)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder / "float")
    return folder / "float"


def load(path: Path, monkeypatch, huge: bool, weights: str = "nf4"):
    monkeypatch.setenv(HUGE_PAGES_ENV, "1" if huge else "0")
    config = LowBitConfig(weights=weights, compute_dtype="float32")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)


def placed_tensors(model) -> list[torch.Tensor]:
    """Every parameter and buffer of the quantized layers and of the head."""
    modules = [m for m in model.modules() if isinstance(m, LowBitLinear)] + [model.lm_head]
    return [t for m in modules for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]]


def test_the_streamed_weights_sit_in_one_mapping_advised_huge_and_compute_the_same(tmp_path, monkeypatch):
    path = save_llama(tmp_path)
    placed, plain = load(path, monkeypatch, huge=True), load(path, monkeypatch, huge=False)
    assert isinstance(placed.lm_head, KeptLinear)
    mappings = {(m["start"], m["end"]): m for m in (mapping_of(t.data_ptr()) for t in placed_tensors(placed))}
    assert len(mappings) == 1 and all("hg" in m["flags"] for m in mappings.values())
    assert not any("hg" in mapping_of(t.data_ptr())["flags"] for t in placed_tensors(plain))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(placed(ids).logits, plain(ids).logits)
    # each tensor its own storage: save_pretrained sees nothing shared, and the reload computes the same
    placed.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, plain(ids).logits)


def test_a_model_larger_than_a_huge_page_gets_huge_pages(tmp_path, monkeypatch):
    # int8 weights of 2 layers x (4 x 512^2 + 3 x 512 x 1536) plus a 256 x 512 float32 head: about 7 MB
    model = load(save_llama(tmp_path, hidden=512, intermediate=1536), monkeypatch, huge=True, weights="int8")
    mapping = mapping_of(model.lm_head.weight.data_ptr())
    assert "hg" in mapping["flags"] and mapping["huge_kb"] >= 2048, mapping


def test_a_tied_head_stays_tied(tmp_path, monkeypatch):
    model = load(save_llama(tmp_path, tie=True), monkeypatch, huge=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "hg" in mapping_of(model.model.embed_tokens.weight.data_ptr())["flags"]


def test_tensors_sharing_a_storage_stay_where_they_are_and_a_tied_one_moves_once():
    a, b, c, d = (KeptLinear(8, 8) for _ in range(4))
    shared = torch.zeros(2, 8, 8)
    a.weight, b.weight = torch.nn.Parameter(shared[0]), torch.nn.Parameter(shared[1])  # two tensors, one storage
    d.weight = c.weight  # one tensor in two modules
    moved = streamed_tensors(torch.nn.Sequential(a, b, c, d))
    assert sorted(map(id, moved)) == sorted(map(id, [a.bias, b.bias, c.weight, c.bias, d.bias]))
