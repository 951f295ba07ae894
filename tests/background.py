"""Slow self-contained jobs some tests need, started in their own processes as soon as pytest has collected (conftest's
pytest_collection_finish), so that they run beside the rest of the suite rather than in series with it; the test
that needs one waits for it (`result`), and starts it then if nothing has.

Each job writes its output to a file (never a pipe a full buffer would block) and keeps its stderr for the error."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# the sm_90 compile report (tests/test_kernels_compile.py): the Triton kernels compiled for Hopper, without a GPU
COMPILE_REPORT = """
import dataclasses, json
from quantizer_plugin.kernels.compile_report import compile_all
print(json.dumps([dataclasses.asdict(report) for report in compile_all()]))
"""


@dataclass(frozen=True)
class Job:
    needed_by: tuple[str, ...]  # the node ids (or their prefixes) of the tests that wait for it
    command: tuple[str, ...]  # {out} stands for the job's output path
    env: tuple[tuple[str, str | None], ...] = ()  # changes to the environment (None: removed)


JOBS = {
    # the small trained LM (tests/tiny_lm.py), in a process of its own with the same torch threads: the same weights
    # then the same LM from a second training seed, into out-seed1 (GPTQ's accuracy is asserted for both)
    "tiny-lm": Job(("tests/test_integer_formats.py::test_small_trained_lm_against_hqq_and_round_to_nearest",
                    "tests/test_gptq.py::test_gptq_moves_the_small_lm_less_than_the_data_free_fit",
                    "tests/test_fp8_accuracy.py::test_fp8_moves_the_small_lm_no_more_than_quantos_qfloat8",
                    "tests/test_w8a8_accuracy.py::"),
                   (sys.executable, str(TESTS / "tiny_lm.py"), "--save", "{out}", "--also-seed", "1")),
    "compile-report": Job(("tests/test_kernels_compile.py::test_every_gpu_candidate_compiles_for_sm90_without_spilling",),
                          (sys.executable, "-c", COMPILE_REPORT),
                          (("TRITON_INTERPRET", None), ("TRITON_DEFAULT_FP_FUSION", "1"))),  # fmt: skip
}

_running: dict[str, tuple[subprocess.Popen, Path]] = {}


def waits(node_id: str) -> bool:
    """Whether the test `node_id` waits for a job."""
    return any(node_id.startswith(job.needed_by) for job in JOBS.values())


def start_needed(node_ids: list[str]) -> None:
    """Start every job one of the collected tests needs."""
    for name, job in JOBS.items():
        if any(node.startswith(job.needed_by) for node in node_ids):  # str.startswith takes a tuple
            _start(name)


def _start(name: str) -> None:
    if name in _running:
        return
    job = JOBS[name]
    folder = Path(tempfile.mkdtemp(prefix=f"quantizer-plugin-{name}-"))
    env = dict(os.environ)
    for key, value in job.env:
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    command = [part.replace("{out}", str(folder / "out")) for part in job.command]
    with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
        # niced: the job takes the cores the tests leave idle, and all of them once a test waits for it
        process = subprocess.Popen(command, cwd=TESTS.parent, env=env, stdout=stdout, stderr=stderr,
                                   preexec_fn=lambda: os.nice(10))  # fmt: skip
    _running[name] = (process, folder)


def result(name: str, timeout: float = 1800) -> Path:
    """The folder of job `name` (its output `out`, its `stdout`) once it has finished, started now if it was not.
    A failed job raises with the end of its stderr."""
    _start(name)
    process, folder = _running[name]
    code = process.wait(timeout=timeout)
    if code != 0:
        raise RuntimeError(f"background job {name!r} failed (exit {code}): {(folder / 'stderr').read_text()[-4000:]}")
    return folder
