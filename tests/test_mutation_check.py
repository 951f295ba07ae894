"""The kept mutation check (tests/mutation_check.py): every breakage is caught, and an unbroken run survives.

Each breakage runs its tests in a fresh process, and most of such a run is importing torch and transformers, which
uses one core: the runs go two at a time, each with one torch thread, and each test below reads its own outcome."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import cpu_caps
import mutation_check

SIDE_BY_SIDE = 2  # measured on 2 cores: 218 s for what took 400 s one by one


def runnable_here(name: str) -> bool:
    needs = mutation_check.mutation(name).needs
    return not needs or getattr(cpu_caps, f"{needs}_here")()


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    names = [name for name in [*mutation_check.MUTATIONS, "control"] if runnable_here(name)]
    with ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
        results = pool.map(lambda name: mutation_check.run(name, threads=1)[0], names)
        return dict(zip(names, results))


@pytest.mark.parametrize("name", mutation_check.MUTATIONS)
def test_breakage_is_caught(name, outcomes):
    if not runnable_here(name):
        needs = mutation_check.MUTATIONS[name].needs
        pytest.skip(f"this CPU runs no {needs} kernel (or QUANTIZER_PLUGIN_MAX_ISA hides it): nothing to break")
    assert outcomes[name] == "caught", f"{name}: {mutation_check.MUTATIONS[name].description}: {outcomes[name]}"


def test_nothing_broken_survives(outcomes):
    assert outcomes["control"] == "SURVIVED"
