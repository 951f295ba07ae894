"""llama.cpp as a peer of benchmarks/cpu_decode.py: the same checkpoint converted to GGUF, decoded through
llama-cpp-python in the same process, with the same prompt and greedy tokens.

Neither llama.cpp nor its converter is a dependency. Build both from the llama-cpp-python sdist (ggml compiled for
this CPU: 12 minutes on the 2-core AMD EPYC of benchmarks/RESULTS.md); the converter also needs sentencepiece:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install ./llama_cpp_python-*/ sentencepiece
    python benchmarks/cpu_decode.py --llama-cpp ./llama_cpp_python-*/vendor/llama.cpp

On the Xeon with AMX of benchmarks/RESULTS.md, that native build's AMX backend segfaults in its first Q4_0 decode,
with or without torch in the process (llama-cpp-python 0.3.36; llama.cpp issue #20824, "segfault in
ggml_backend_amx_mul_mat", open and machine-dependent). There, build ggml with AVX-512 and without AMX:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
      -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
      -DGGML_AMX_BF16=OFF" pip install ./llama_cpp_python-*/

The sdist's `convert_hf_to_gguf.py` writes the bf16 GGUF; llama.cpp's own quantizer (`llama_model_quantize`, the
library call behind `llama-quantize`) makes Q8_0, Q4_0 and Q4_K_M from it. The converter needs a tokenizer, which a
random benchmark model lacks: `write_made_up_tokenizer` writes a Llama-style one (byte fallback, the model's vocabulary
size) that no measurement depends on, since every provider is fed token ids.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

# provider -> llama.cpp file type: the bf16 conversion, then what llama-quantize makes of it
FILE_TYPES = {"llamacpp-bf16": "BF16", "llamacpp-q8_0": "Q8_0", "llamacpp-q4_0": "Q4_0", "llamacpp-q4_k_m": "Q4_K_M"}


def write_made_up_tokenizer(path: Path, vocab_size: int) -> None:
    """A Llama-style tokenizer (BPE with byte fallback; <unk> <s> </s>, the 256 byte tokens, the word start, then
    made-up words up to `vocab_size`), saved beside the model as tokenizer.json: what the converter reads for a Llama
    without tokenizer.model."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + ["\u2581"]  # the word start
    pieces += [f"\u2581w{i}" for i in range(vocab_size - len(pieces))]
    tokenizer = Tokenizer(models.BPE(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[],
                                     unk_token="<unk>", byte_fallback=True))  # fmt: skip
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def gguf_file(model: Path, provider: str, source: Path, out: Path) -> Path:
    """The GGUF of `model` in the provider's file type, converted (and quantized) once into `out`."""
    import llama_cpp

    file_type = FILE_TYPES[provider]
    target = out / f"{model.name}-{file_type.lower()}.gguf"
    if target.exists():
        return target
    bf16 = out / f"{model.name}-bf16.gguf"
    if not bf16.exists():
        converter = source / "convert_hf_to_gguf.py"
        if not converter.is_file():
            raise FileNotFoundError(f"--llama-cpp {source}: no convert_hf_to_gguf.py there (give the sdist's "
                                    "vendor/llama.cpp folder)")  # fmt: skip
        if not (model / "tokenizer.json").exists():
            write_made_up_tokenizer(model, _vocab_size(model))
        partial = bf16.with_suffix(".partial")
        done = subprocess.run([sys.executable, str(converter), str(model), "--outtype", "bf16", "--outfile", str(partial)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{converter.name} failed: {done.stderr.strip().splitlines()[-1:]}")
        partial.rename(bf16)
    if target == bf16:
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = 0  # every core
    partial = target.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(bf16).encode(), str(partial).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize to {file_type} failed")
    partial.rename(target)
    return target


def _vocab_size(model: Path) -> int:
    import json

    return json.loads((model / "config.json").read_text())["vocab_size"]


class LlamaCppModel:
    """A GGUF loaded by llama-cpp-python with this process's torch thread count, timed like a transformers generate:
    `decode(prompt, tokens)` returns the push times (the call's start, then each new token as it is chosen)."""

    def __init__(self, path: Path, threads: int, context: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)  # fmt: skip
        self.size_bytes = path.stat().st_size

    def decode(self, prompt: list[int], tokens: int) -> list[float]:
        self.llm.reset()  # no prompt cache: every sample pays its prefill, as generate does
        times = [time.perf_counter()]
        for _ in zip(range(tokens), self.llm.generate(prompt, temp=0.0, reset=True)):  # temp 0: greedy
            times.append(time.perf_counter())
        return times
