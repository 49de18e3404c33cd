"""Shared test set-up.

* No GPU here: Triton kernels run in its interpreter. ``TRITON_INTERPRET`` must be set before any
  ``@triton.jit`` function is defined, i.e. before ``kernels`` is imported, so it is set at the top.
* ``FP4ROLL_HOME`` points at a per-session temp dir so tests never touch a user's state.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_SESSION_HOME = tempfile.mkdtemp(prefix="fp4roll-test-home-")
os.environ["FP4ROLL_HOME"] = _SESSION_HOME
# Prefect reads its settings when first imported: keep its state (and results) out of ~/.prefect.
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_HOME, "prefect")

POSTGRES_URL = os.environ.get(
    "FP4ROLL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_unavailable_reason() -> str | None:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}: {exc}".splitlines()[0]
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A reachable PostgreSQL URL, or the test is skipped with the reason."""
    reason = _postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def fp4roll_home() -> str:
    return _SESSION_HOME
