"""FSDP2 (`fully_shard`) on a quantized model with LoRA: two gloo processes on CPU take the one-process step."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from quantizer_plugin import LowBitConfig

WORKER = Path(__file__).with_name("fsdp_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(model_dir, out: Path, world_size: int, tmp_path: Path) -> list[float]:
    port = free_port()
    command = [sys.executable, str(WORKER), str(model_dir), str(out), str(world_size)]
    ranks = [
        subprocess.Popen([*command, str(rank), str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in range(world_size)
    ]
    outputs = [rank.communicate(timeout=300)[0].decode() for rank in ranks]
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 0, output[-3000:]
    return json.loads(out.read_text())["losses"]


def test_no_stored_tensor_is_a_scalar(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig(weights="nf4"))
    assert all(param.ndim >= 1 for param in model.parameters())


def test_fully_shard_lora_step_on_two_processes_equals_one_process(llama_dir, tmp_path):
    one = run_ranks(llama_dir, tmp_path / "one.json", 1, tmp_path)
    two = run_ranks(llama_dir, tmp_path / "two.json", 2, tmp_path)
    # [loss of the step, loss after it]: the step lowered the loss, and FSDP took the very same step
    assert one[1] < one[0]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
