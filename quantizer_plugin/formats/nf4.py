"""NF4 (NormalFloat4, QLoRA): 16 quantiles of a standard normal, rescaled to [-1, 1], zero exact."""

import torch

from .base import register_format
from .codebook4bit import Codebook4BitFormat

# The values bitsandbytes ships (create_normal_map(offset=0.9677083, use_extra_value=True)), in code order.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip

NF4 = register_format(Codebook4BitFormat("nf4", NF4_CODE))
