"""One rank of test_fsdp.py: a LoRA training step on a quantized model under FSDP2, or the same step in one process.

    python fsdp_worker.py MODEL_DIR OUT_JSON WORLD_SIZE RANK PORT    (WORLD_SIZE 1: no process group, no FSDP)

Every rank builds the same batch and takes its own rows of it; with equal rows per rank, the mean of the ranks'
losses is the one-process loss and FSDP's averaged gradients are the one-process gradients.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

import quantizer_plugin
from peft import LoraConfig, get_peft_model

BATCH, LENGTH, LR = 4, 12, 0.5


def main(model_dir: str, out: str, world_size: int, rank: int, port: int) -> None:
    torch.manual_seed(0)
    distributed = world_size > 1
    if distributed:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    config = quantizer_plugin.LowBitConfig(weights="nf4", compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a random start makes the first step move every adapter
            torch.nn.init.normal_(param, std=0.02)
    if distributed:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)

    ids = torch.randint(0, 320, (BATCH, LENGTH), generator=torch.Generator().manual_seed(3))
    rows = ids.chunk(world_size)[rank]
    losses = []
    for step in range(2):
        loss = model(input_ids=rows, labels=rows).loss
        losses.append(loss.detach())
        if step == 0:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    losses = torch.stack(losses)
    if distributed:
        dist.all_reduce(losses)
        losses /= world_size
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"losses": losses.tolist()}, handle)


if __name__ == "__main__":
    model_dir, out, world_size, rank, port = sys.argv[1:]
    main(model_dir, out, int(world_size), int(rank), int(port))
