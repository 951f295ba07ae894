"""Shared fixtures: small models built from configs and saved locally (nothing comes from the Hub)."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run on Triton's interpreter; triton reads this when a kernel is defined, so it
# must be set before quantizer_plugin.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import quantizer_plugin  # noqa: F401  (registers "lowbit" with transformers)

import background


def pytest_collection_modifyitems(session, config, items):
    """The tests that wait for a background job run last (in their order), so that the job runs beside the rest of
    the suite instead of holding the suite up at the first of them (tests/background.py)."""
    waiting = [item for item in items if background.waits(item.nodeid)]
    items[:] = [item for item in items if not background.waits(item.nodeid)] + waiting


def pytest_collection_finish(session):
    """Start the slow self-contained jobs the collected tests need (tests/background.py), to run beside them (not
    when pytest only lists them)."""
    if session.config.option.collectonly:
        return
    background.start_needed([item.nodeid for item in session.items])


def available_devices() -> list[str]:
    """The same tests run on CPU in CI and on CUDA when there is one."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=available_devices())
def device(request) -> str:
    return request.param


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny random Llama saved in bfloat16, with odd (non-block-multiple) linear shapes."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(intermediate_size=150)).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2: its projections are Conv1D, with (in, out) weights."""
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4))
    path = tmp_path_factory.mktemp("gpt2") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture
def token_ids():
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, 300, (2, 11), generator=generator)
