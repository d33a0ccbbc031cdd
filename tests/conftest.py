"""Fixtures shared by every test folder (tests/<stage>/ mirrors gold_pipeline/<stage>/).

The helpers themselves live in tests/helpers.py (plain functions, importable from scripts that tests start in
subprocesses); the fixtures below hand them to tests that prefer injection."""

from __future__ import annotations

import pytest

from tests import helpers


@pytest.fixture(scope="session")
def tok():
    """tok(name) -> the shared packaged tokenizer (read-only: load a fresh one to change its template)."""
    return helpers.tok


@pytest.fixture(scope="session")
def table():
    """table(name) -> the byte table of the shared tokenizer."""
    return helpers.table


@pytest.fixture(scope="session")
def demo_data():
    """The packaged demo data folder (gold_pipeline/recipes/demo_data)."""
    return helpers.DEMO_DATA
