"""quantizer_plugin: low-bit (NF4/FP4/LLM.int8) weights for Hugging Face Transformers.

Importing the package registers the quantization method "lowbit" with transformers, so that

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LowBitConfig(weights="nf4"))

quantizes the model's linear layers while it loads, and a saved quantized model reloads without a config.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .config import FORMAT_VERSION, QUANT_METHOD, LowBitConfig, preset_names
from .modules import LowBitLinear
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


def _register_lora_with_peft() -> None:
    try:
        importlib.import_module("quantizer_plugin.lora").register_with_peft()
    except (ImportError, AttributeError) as exc:
        # A peft whose internals moved must still import; only LoRA on our layers is then unavailable.
        warnings.warn(f"quantizer_plugin: LoRA on quantized layers is unavailable with this peft version ({exc!r})")


class _RegisterWithPeftOnImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: once `import peft` has run, teach its LoRA about our layers (quantizer_plugin.lora).

    peft is optional and slow to import (it pulls in bitsandbytes), so we never import it ourselves; this lets a user
    who only did `import quantizer_plugin` call get_peft_model on a quantized model, in whichever order they import.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return None
        run_peft_init = spec.loader.exec_module

        def exec_module(module):
            run_peft_init(module)
            _register_lora_with_peft()

        spec.loader.exec_module = exec_module
        return spec


if sys.modules.get("peft") is not None:  # None: a blocked import, as if peft were not installed
    _register_lora_with_peft()
elif not any(isinstance(finder, _RegisterWithPeftOnImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithPeftOnImport())

__all__ = [
    "FORMAT_VERSION",
    "CheckpointFormatError",
    "LowBitConfig",
    "LowBitHfQuantizer",
    "LowBitLinear",
    "preset_names",
    "__version__",
]
