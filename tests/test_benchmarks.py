"""The GEMM benchmark runs unattended: its smoke mode (tiny shapes, Triton's interpreter on CPU) writes a report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gemm_4bit(monkeypatch):
    # main() sets these only where unset; setting them here means they are restored after the test, so later tests
    # do not run on the interpreter.
    monkeypatch.setenv("QUANTIZER_PLUGIN_KERNELS", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    pytest.importorskip("triton")
    import gemm_4bit

    return gemm_4bit


def test_gemm_4bit_smoke_run_writes_rows_and_report_and_results_collects_it(gemm_4bit, monkeypatch, tmp_path):
    """One real run (the GEMM benchmark's smoke run, through the interpreter), checked twice over: its rows and
    report, and results.py collecting it into RESULTS.md under its command (the other runs are the same machinery)."""
    import results

    monkeypatch.setattr(results, "RUNS", results.RUNS[:1])
    target = tmp_path / "RESULTS.md"
    assert results.main(["--smoke", "--out", str(tmp_path), "--results", str(target)]) == 0
    text = target.read_text()
    assert text.startswith("# Kernel benchmark results") and "not a measurement" in text
    assert "`python benchmarks/gemm_4bit.py --cuda-graph --smoke`" in text
    assert "### GEMMs" in text and "### Targets" in text  # the run's report, its headings one level down
    run = tmp_path / "nf4-bf16-graph"
    rows = [json.loads(line) for line in (run / "gemm_4bit.jsonl").read_text().splitlines()]
    providers = {row["provider"] for row in rows}
    assert {"bf16", "lowbit"} <= providers
    gemm = [row for row in rows if "rel_error" in row["extra"]]
    assert {(row["shape"], row["m"]) for row in gemm} == {
        (f"{n}x{k}", m) for n, k in gemm_4bit.SMOKE_SHAPES for m in gemm_4bit.SMOKE_BATCH_SIZES
    }
    assert all(row["median_ms"] > 0 for row in gemm)
    # Errors against the float64 product with the 16-bit weight: bf16 rounds once; our NF4 and bitsandbytes' NF4
    # (same codes, independent code) both carry the quantization error, and carry the same one.
    errors = {(row["shape"], row["m"], row["provider"]): row["extra"]["rel_error"] for row in gemm}
    for (shape, m, provider), error in errors.items():
        if provider == "bf16":
            assert error < 1e-2
        elif provider == "lowbit":
            assert 0.02 < error < 0.3, (shape, m, error)
            peer = errors.get((shape, m, "bnb"))
            assert peer is None or abs(error - peer) <= 0.1 * peer, (shape, m, error, peer)
    assert any("decoder block" in row["shape"] for row in rows)
    report = (run / "gemm_4bit.md").read_text()
    assert "## GEMMs" in report and "lowbit speedup vs bf16" in report and rows[0]["torch"] in report


def test_a_provider_slowed_on_purpose_is_timed_slower(gemm_4bit, monkeypatch):
    import time

    call = gemm_4bit.Operands.call

    def slowed(self, provider, x):
        run = call(self, provider, x)
        if provider != "bnb":
            return run

        def slow():
            time.sleep(0.03)
            return run()

        return slow

    monkeypatch.setattr(gemm_4bit.Operands, "call", slowed)
    rows = gemm_4bit.gemm_rows([(96, 128)], [1], ["bf16", "bnb"], torch.bfloat16, "cpu", rep=3, cuda_graph=False)
    median = {row.provider: row.median_ms for row in rows}
    assert median["bnb"] >= 30 and median["bnb"] > median["bf16"] + 25, median


@pytest.fixture
def results(gemm_4bit):
    import results

    return results


def test_results_is_not_written_when_a_run_fails(results, monkeypatch, tmp_path):
    class Benchmark:
        """Writes its report as a benchmark does, then returns `code`."""

        __file__ = "fake.py"

        def __init__(self, code):
            self.code = code

        def main(self, argv):
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "fake.md").write_text("# fake report\n")
            return self.code

    target = tmp_path / "RESULTS.md"
    monkeypatch.setattr(results, "RUNS", [("ok", "ok", Benchmark(0), []), ("broken", "broken", Benchmark(1), [])])
    assert results.main(["--smoke", "--out", str(tmp_path), "--results", str(target)]) == 1
    assert not target.exists()
    monkeypatch.setattr(results, "RUNS", results.RUNS[:1])
    assert results.main(["--smoke", "--out", str(tmp_path / "again"), "--results", str(target)]) == 0
    assert "fake report" in target.read_text()


@pytest.fixture
def cpu_benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("QUANTIZER_PLUGIN_KERNELS", raising=False)
    import cpu_decode
    import cpu_layers

    return cpu_layers, cpu_decode


def test_cpu_layer_benchmark_smoke_run_measures_our_cpu_kernels(cpu_benchmarks, tmp_path):
    cpu_layers, _ = cpu_benchmarks
    providers = "bf16,lowbit-nf4,lowbit-int8,lowbit-int4,bnb-nf4"
    assert cpu_layers.main(["--smoke", "--out", str(tmp_path), "--providers", providers]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cpu_layers.jsonl").read_text().splitlines()]
    assert {(row["provider"], row["m"]) for row in rows} == {
        (p, m) for p in providers.split(",") for m in cpu_layers.SMOKE_BATCH_SIZES
    }
    error = {(row["provider"], row["m"]): row["extra"]["rel_error"] for row in rows}
    for m in cpu_layers.SMOKE_BATCH_SIZES:  # against the 16-bit product: ours and bitsandbytes' NF4 alike
        assert error["bf16", m] < 1e-2 and 1e-3 < error["lowbit-int8", m] < 3e-2
        assert abs(error["lowbit-nf4", m] - error["bnb-nf4", m]) <= 0.2 * error["bnb-nf4", m]
    report = (tmp_path / "cpu_layers.md").read_text()
    assert "lowbit-nf4: cpu.codebook4bit." in report and "lowbit-int8: cpu.int8.llm_int8" in report and "Targets:" in report
    assert "lowbit-int4: cpu.affine." in report
    # at M = 1 each layer's stored bytes over its time, against the machine's measured read bandwidth
    stored = {row["provider"]: row["bytes_moved"] for row in rows if row["m"] == 1}
    n, k = cpu_layers.SMOKE_SHAPES[0]
    assert stored["bf16"] == 2 * n * k and n * k // 2 < stored["lowbit-nf4"] < n * k * 5 // 8  # codes and absmax
    lines = [line for line in report.splitlines() if line.startswith(f"- {n}x{k}, ") and "of it (target" in line]
    assert [line.split(", ")[1].split(":")[0] for line in lines] == ["bf16", "lowbit-nf4", "lowbit-int8", "lowbit-int4"]
    assert "Read bandwidth of this machine" in report


def test_cpu_decode_benchmark_smoke_run(cpu_benchmarks, tmp_path):
    _, cpu_decode = cpu_benchmarks
    providers = ["bf16", "lowbit-nf4", "lowbit-nf4-q8_0-head=int4", "lowbit-nf4-compiled"]
    arguments = ["--smoke", "--out", str(tmp_path), "--providers", ",".join([*providers, "llamacpp-q4_0"])]
    assert cpu_decode.main(arguments) == 0
    rows = [json.loads(line) for line in (tmp_path / "cpu_decode.jsonl").read_text().splitlines()]
    assert [row["provider"] for row in rows] == providers and all(row["median_ms"] > 0 for row in rows)
    assert all(0 < row["extra"]["prefill_ms_per_prompt_token"] < row["median_ms"] * 2 for row in rows), rows
    report = (tmp_path / "cpu_decode.md").read_text()
    assert "lowbit-nf4:" in report
    # llama.cpp is an optional peer: without its converter's folder it is skipped, and the report says why
    assert "Skipped: llamacpp-q4_0 (RuntimeError: no --llama-cpp folder given)" in report


def test_decode_overhead_smoke_run_times_the_step_with_and_without_the_layers(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("QUANTIZER_PLUGIN_KERNELS", raising=False)
    import decode_overhead
    from quantizer_plugin import ops

    real = ops.lowbit_linear, ops.kept_linear
    assert decode_overhead.main(["--smoke", "--out", str(tmp_path), "--providers", "lowbit-nf4"]) == 0
    assert (ops.lowbit_linear, ops.kept_linear) == real  # the stand-ins are gone once it returns
    row = next(line for line in (tmp_path / "decode_overhead.md").read_text().splitlines() if line.startswith("| lowbit"))
    whole, overhead, layers = (float(cell) for cell in row.strip("|").split("|")[1:])
    assert 0 < overhead < whole and layers == pytest.approx(whole - overhead, abs=0.11)
    assert "lowbit-nf4: " in (tmp_path / "decode_overhead.md").read_text()


def test_the_made_up_tokenizer_is_one_the_gguf_converter_reads(monkeypatch, tmp_path):
    """llama.cpp's converter needs a tokenizer beside the random model: a Llama-style one (BPE with byte fallback and
    the Sequence decoder, the checks of gguf's LlamaHfVocab) with exactly the model's vocabulary."""
    from transformers import AutoTokenizer

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import llama_cpp_peer

    llama_cpp_peer.write_made_up_tokenizer(tmp_path, 1000)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["model"]["type"] == "BPE" and saved["model"]["byte_fallback"] and saved["decoder"]["type"] == "Sequence"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.is_fast and len(tokenizer) == 1000 and tokenizer.convert_ids_to_tokens(3) == "<0x00>"
    ids = tokenizer("é!", add_special_tokens=False)["input_ids"]
    assert ids[0] == 259 and all(3 <= i < 259 for i in ids[1:])  # the word start, then bytes through the fallback
    assert tokenizer.decode(ids) == "é!"


def test_a_recorded_run_replaces_only_its_own_section_of_the_results(cpu_benchmarks, tmp_path):
    """`--record` writes the report into RESULTS.md as this benchmark's section on this CPU and these kernel paths:
    run again, it replaces that section; another benchmark's, another machine's and the hand-written text stay."""
    _, cpu_decode = cpu_benchmarks
    results = tmp_path / "RESULTS.md"
    key = "cpu_decode on Other CPU (avx512)"
    other_machine = f"<!-- results: {key} -->\nkept\n<!-- /results: {key} -->"
    results.write_text(f"# Measured results\n\nHand-written notes.\n\n{other_machine}\n")
    arguments = ["--smoke", "--out", str(tmp_path / "out"), "--providers", "bf16,lowbit-nf4", "--record", str(results)]
    assert cpu_decode.main(arguments) == 0
    first = results.read_text()
    assert first.startswith("# Measured results\n\nHand-written notes.\n") and other_machine in first
    sections = first.count("<!-- results: ")
    assert sections == 2 and "| lowbit-nf4 |" in first and "our kernels use" in first
    assert cpu_decode.main(arguments) == 0
    second = results.read_text()
    assert second.count("<!-- results: ") == 2 and other_machine in second  # replaced, not appended
    assert second.count("| lowbit-nf4 |") == 1
