"""Parameter counts that count a quantized layer's weights, not its packed bytes and statistics.

transformers' `model.num_parameters()` and PEFT's `get_nb_trainable_parameters()` (behind
`print_trainable_parameters()`) sum `param.numel()` over the parameters, and both recognise only bitsandbytes'
Params4bit as packed (transformers#25978). A LowBitLinear's parameters are its stored tensors (two 4-bit codes per
byte, plus absmax statistics), so the plain sum is wrong for us. Neither library has a hook for this, so:
  - a model loaded with our quantizer gets its own `num_parameters`, a bound method in its __dict__ (it follows the
    model through deepcopy and is removed by dequantize()), which adds `count_correction` to transformers' count;
  - PEFT's `PeftModel.get_nb_trainable_parameters` is wrapped when LoRA is registered with peft (lora.py).
"""

from __future__ import annotations

from torch import nn

from .integrations.transformers import class_method, override_method, restore_method
from .modules import LowBitLinear


def count_correction(model: nn.Module) -> int:
    """Weights held by the model's quantized layers minus the elements of their stored tensors.

    The stored tensors are frozen, so a count of trainable parameters needs no correction.
    """
    correction = 0
    for module in model.modules():
        if isinstance(module, LowBitLinear):
            stored = sum(tensor.numel() for tensor in module.quantized_tensors().values())
            correction += module.in_features * module.out_features - stored
    return correction


def _num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    count = class_method(self, "num_parameters")(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    return count if only_trainable else count + count_correction(self)


def attach_parameter_count(model: nn.Module) -> None:
    override_method(model, "num_parameters", _num_parameters)


def detach_parameter_count(model: nn.Module) -> None:
    restore_method(model, "num_parameters")
