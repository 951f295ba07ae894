"""Preset quantization configs, one JSON file each; load them with LowBitConfig.from_preset(name)."""
