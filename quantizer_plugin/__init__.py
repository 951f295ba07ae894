"""quantizer_plugin: low-bit weights (NF4/FP4, LLM.int8 and weight-only int8, int4/int2) for Hugging Face Transformers.

Importing the package registers the quantization method "lowbit" with transformers, so that

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LowBitConfig(weights="nf4"))

quantizes the model's linear layers while it loads, and a saved quantized model reloads without a config.
"""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .config import FORMAT_VERSION, QUANT_METHOD, LowBitConfig, preset_names
from .checkpoints.paths import CheckpointPathError
from .checkpoints.convert import ConversionError, convert_checkpoint
from .modules import LowBitLinear
from .peft_registration import install as install_peft_registration
from .prequantized_config import install as install_prequantized_config_check
from .quantizer import LowBitHfQuantizer
from .serialization import CheckpointFormatError

__version__ = "0.1.0"

# Idempotent: a re-import (importlib.reload in a notebook) must not fail on "already registered".
if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LowBitConfig:
    AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    register_quantization_config(QUANT_METHOD)(LowBitConfig)
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LowBitHfQuantizer:
    AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    register_quantizer(QUANT_METHOD)(LowBitHfQuantizer)

# A LowBitConfig passed for a checkpoint we quantized: an error where it disagrees (prequantized_config.py).
install_prequantized_config_check()

# PEFT's LoRA learns about our layers whenever peft is imported, before or after this package (peft_registration.py).
install_peft_registration()

__all__ = [
    "FORMAT_VERSION",
    "CheckpointFormatError",
    "CheckpointPathError",
    "ConversionError",
    "LowBitConfig",
    "LowBitHfQuantizer",
    "LowBitLinear",
    "convert_checkpoint",
    "preset_names",
    "__version__",
]
