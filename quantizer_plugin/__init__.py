"""quantizer_plugin: low-bit weights (NF4/FP4, LLM.int8, int8, int4/int3/int2, fp8) and 8-bit activations for Hugging Face
Transformers.

Importing the package registers the quantization method "lowbit" with transformers, so that

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LowBitConfig(weights="nf4"))

quantizes the model's linear layers while it loads, and a saved quantized model reloads without a config.
"""

from .activation_scales import Calibration, calibrate
from .config import FORMAT_VERSION, QUANT_METHOD, LowBitConfig, preset_names
from .checkpoints.paths import CheckpointPathError
from .checkpoints.convert import ConversionError, convert_checkpoint
from .integrations.peft import install as install_peft_registration
from .integrations.transformers import register_quantization_method
from .modules import LowBitLinear, UncalibratedLayerError
from .prequantized_config import install as install_prequantized_config_check
from .quantizer import LowBitHfQuantizer
from .serialization import CheckpointFormatError

__version__ = "0.1.0"

register_quantization_method(QUANT_METHOD, LowBitConfig, LowBitHfQuantizer)  # idempotent (a re-import is fine)

# A LowBitConfig passed for a checkpoint we quantized: an error where it disagrees (prequantized_config.py).
install_prequantized_config_check()

# PEFT's LoRA learns about our layers whenever peft is imported, before or after this package (integrations/peft.py).
install_peft_registration()

__all__ = [
    "FORMAT_VERSION",
    "Calibration",
    "CheckpointFormatError",
    "CheckpointPathError",
    "ConversionError",
    "LowBitConfig",
    "LowBitHfQuantizer",
    "LowBitLinear",
    "UncalibratedLayerError",
    "calibrate",
    "convert_checkpoint",
    "preset_names",
    "__version__",
]
