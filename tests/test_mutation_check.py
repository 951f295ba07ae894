"""The kept mutation check (tests/mutation_check.py): every breakage is caught, and an unbroken run survives."""

from __future__ import annotations

import pytest

import cpu_caps
import mutation_check


@pytest.mark.parametrize("name", mutation_check.MUTATIONS)
def test_breakage_is_caught(name):
    needs = mutation_check.MUTATIONS[name].needs
    if needs and not getattr(cpu_caps, f"{needs}_here")():
        pytest.skip(f"this CPU runs no {needs} kernel (or QUANTIZER_PLUGIN_MAX_ISA hides it): nothing to break")
    outcome, _ = mutation_check.run(name)
    assert outcome == "caught", f"{name}: {mutation_check.MUTATIONS[name].description}: {outcome}"


def test_nothing_broken_survives():
    assert mutation_check.run("control")[0] == "SURVIVED"
