"""Checkpoints in one wing: reading other checkpoints, converting them, and writing folders all or nothing.

- headers.py: the one safetensors header reader (names, shapes and dtypes without reading any tensor's data).
- source.py: a checkpoint folder read lazily, shard names checked, each tensor's data read when asked for.
- convert.py: convert_checkpoint, with an importer per foreign `quant_method` and an exporter per target, streaming
  one output shard at a time.
- bitsandbytes.py: the first importer and exporter (bitsandbytes' Linear4bit / Linear8bitLt layouts).
- fp8.py: transformers' fine-grained FP8 checkpoints into our fp8.
- paths.py: file names from a checkpoint, checked before anything is opened or written.
- staging.py: writing a checkpoint folder all or nothing.
Our own layout's check before a pre-quantized load is serialization.py's, which reads headers through headers.py.
"""
