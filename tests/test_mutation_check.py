"""The kept mutation check (tests/mutation_check.py): every breakage is caught, and an unbroken run survives.

Each breakage runs its tests in a fresh process forked from one that has imported torch and transformers; such a
run is mostly single-threaded Python, so the runs go two at a time, each with one torch thread, and each test below
reads its own outcome."""

from __future__ import annotations

import os

import pytest

import cpu_caps
import mutation_check

SIDE_BY_SIDE = 2  # on 2 cores: 218 s for what took 400 s one by one (subprocesses, before the fork server)


def runnable_here(name: str) -> bool:
    needs = mutation_check.mutation(name).needs
    return not needs or getattr(cpu_caps, f"{needs}_here")()


def in_this_run(name: str) -> bool:
    fast_only = os.environ.get(mutation_check.SUBSET_ENV) == "fast"
    return not (fast_only and mutation_check.mutation(name).slow)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    names = [name for name in [*mutation_check.MUTATIONS, "control"] if runnable_here(name) and in_this_run(name)]
    return {name: outcome for name, (outcome, _) in mutation_check.run_all(names, SIDE_BY_SIDE).items()}


@pytest.mark.parametrize("name", mutation_check.MUTATIONS)
def test_breakage_is_caught(name, outcomes):
    if not runnable_here(name):
        needs = mutation_check.MUTATIONS[name].needs
        pytest.skip(f"this CPU runs no {needs} kernel (or QUANTIZER_PLUGIN_MAX_ISA hides it): nothing to break")
    if not in_this_run(name):
        pytest.skip(f"{mutation_check.SUBSET_ENV}=fast (CI): a slow breakage, run by `python tests/mutation_check.py "
                    f"{name}` before resolving an issue that touches it")
    assert outcomes[name] == "caught", f"{name}: {mutation_check.MUTATIONS[name].description}: {outcomes[name]}"


def test_nothing_broken_survives(outcomes):
    assert outcomes["control"] == "SURVIVED"
