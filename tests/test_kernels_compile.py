"""Every kernel, at every GPU tile candidate the autotuner may pick, compiles for sm_90 (H100) with Triton's own
compiler and bundled ptxas, no GPU needed, and keeps its registers (no spills to local memory).

Code that Triton's interpreter runs but the GPU compiler rejects fails here, on this CPU machine. The compile runs
in a fresh process without TRITON_INTERPRET, so that the kernels are defined for the GPU compiler.
"""

from __future__ import annotations

import json

import background


def test_every_gpu_candidate_compiles_for_sm90_without_spilling():
    # a fresh process without TRITON_INTERPRET, running beside the suite since collection (tests/background.py)
    stdout = (background.result("compile-report") / "stdout").read_text()
    reports = json.loads(stdout.splitlines()[-1])

    kernels = {report["build"].split(" (")[0].split(" BLOCK")[0] for report in reports}
    expected = {"int8 tiled", "int8 streaming", "int8 grad_input", "int8 row quantize"}
    for family in ("4bit", "int4", "int3", "int2", "int8 weight-only", "fp8", "fp8_e5m2"):  # one generic kernel, each KIND of weight compiled
        expected |= {f"{family} forward, decode", f"{family} forward, prefill", f"{family} grad_input"}
    assert expected <= kernels, kernels
    assert any("SPLIT_K=4" in report["build"] for report in reports)  # the split-K reduction compiles too
    spilling = [f"{report['build']}: {report['spilled_bytes']} B" for report in reports if report["spilled_bytes"]]
    assert not spilling, spilling
    assert all(0 < report["registers"] <= 255 for report in reports)
