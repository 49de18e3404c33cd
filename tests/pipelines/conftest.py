"""Prefect fixtures: one ephemeral API for the whole session (it takes 6–12 s to start)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """Run flows against a throw-away local Prefect API (PREFECT_HOME is a temp dir, see tests/conftest.py)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
