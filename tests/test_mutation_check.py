"""The kept mutation check (tests/mutation_check.py): every breakage is caught, and an unbroken run survives."""

from __future__ import annotations

import pytest

import mutation_check


@pytest.mark.parametrize("name", mutation_check.MUTATIONS)
def test_breakage_is_caught(name):
    outcome, _ = mutation_check.run(name)
    assert outcome == "caught", f"{name}: {mutation_check.MUTATIONS[name].description}: {outcome}"


def test_nothing_broken_survives():
    assert mutation_check.run("control")[0] == "SURVIVED"
