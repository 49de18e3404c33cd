"""Read-only commands (`status`, `logs sets`, `logs drift`) never create or migrate the store: they
say which command to run instead."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from pipelines.cli import app
from registry import db

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        ["status", "-m", "nothing-registered"],
        ["logs", "sets"],
        ["logs", "drift", "--set", "abcdef0123"],
    ],
)
def test_read_only_command_refuses_an_unmigrated_store(tmp_path, command):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = ["--tracking-uri", tracking] if command[0] == "status" else []
    try:
        result = runner.invoke(app, [*command, "--db", url, *extra])
        assert result.exit_code != 0
        assert "fp4roll db upgrade" in result.output + (result.stderr or "")
        assert db.current_revision(url) is None
        assert sa.inspect(db.get_engine(url)).get_table_names() == []
    finally:
        db.dispose_engines()


def test_status_of_a_migrated_empty_store_lists_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        db.upgrade(url)
        result = runner.invoke(
            app, ["status", "-m", "nobody", "--db", url, "--tracking-uri", tracking]
        )
        assert result.exit_code == 0, result.output
        assert "nobody: versions" in result.output and "recent rollouts" in result.output
    finally:
        db.dispose_engines()
