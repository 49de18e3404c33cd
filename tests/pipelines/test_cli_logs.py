"""`fp4roll db upgrade` and `fp4roll logs ...` through typer's CliRunner (SQLite)."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from calibration.data import SAMPLE_PROMPT_LOGS
from pipelines.cli import app
from registry import db

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_logs_cli_import_sample_drift(tmp_path, tiny_llama_dir) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    try:
        result = _invoke("db", "upgrade", "--db", url)
        assert result.exit_code == 0 and "revision" in result.output
        assert _invoke("db", "upgrade", "--db", url).exit_code == 0  # idempotent

        result = _invoke("logs", "import", str(SAMPLE_PROMPT_LOGS), "--db", url)
        assert result.exit_code == 0, result.output
        assert "3,374" in result.output and "all lines imported" in result.output

        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(b'{"prompt": "fine", "route": "r", "created": 1768000000}\nnot json\n')
        result = _invoke("logs", "import", str(bad), "--db", url)
        assert result.exit_code == 2  # partial success
        assert f"{bad}:2: invalid JSON" in result.output

        sample = (
            "logs", "sample", "--calibration-size", "40", "--sensitivity-size", "4",
            "--holdout-size", "20", "--route", "translate", "--until", "2026-01-26",
            "--source", tiny_llama_dir, "--db", url,
        )  # fmt: skip
        result = _invoke(*sample, "--json")
        assert result.exit_code == 0, result.output
        payload = json.loads(result.output)
        digest = payload["digest"]
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
        assert payload["summary"]["calibration"]["routes"] == {"translate": 40}

        result = _invoke(*sample)
        assert (
            result.exit_code == 0 and digest in result.output and "already stored" in result.output
        )

        assert digest[:16] in _invoke("logs", "sets", "--db", url).output

        # Production is all five routes; the set is translation only: drift (exit 3).
        result = _invoke("logs", "drift", "--set", digest[:12], "--db", url)
        assert result.exit_code == 3, result.output
        assert "DRIFT" in result.output and "route-share PSI" in result.output

        result = _invoke("logs", "drift", "--set", "0000000000", "--db", url)
        assert result.exit_code == 1
        result = _invoke(
            "logs",
            "sample",
            "--calibration-size",
            "100000",
            "--source",
            tiny_llama_dir,
            "--db",
            url,
        )
        assert result.exit_code == 1 and "unique prompts" in result.output
        result = _invoke("logs", "sample", "--calibration-size", "0", "--db", url)
        assert result.exit_code == 2 and "calibration_size" in result.output
    finally:
        db.dispose_engines()


def test_logs_cli_purge_counts_first_and_never_prints_the_text(tmp_path, caplog) -> None:
    url = f"sqlite:///{tmp_path / 'purge.db'}"
    name = "Oskar Lindqvist-Maier"
    logs = tmp_path / "p.jsonl"
    logs.write_text(
        "".join(
            json.dumps({"prompt": text, "route": route, "created": 1768000000 + i}) + "\n"
            for i, (text, route) in enumerate(
                [
                    (f"I am {name}, mail oskar@example.com", "chat"),
                    ("hello", "chat"),
                    ("x = 1", "code"),
                ]
            )
        )
    )
    try:
        result = _invoke("logs", "import", str(logs), "--db", url)
        assert result.exit_code == 0 and "stored redactions of 3 prompts" in result.output
        from registry import prompt_logs as store

        stored = {p.text: p for p in store.fetch_window(url)}
        assert (
            stored[f"I am {name}, mail oskar@example.com"].redacted_text
            == f"I am {name}, mail [EMAIL]"
        )

        result = _invoke("logs", "purge", "--db", url)
        assert result.exit_code == 1 and "at least one filter" in result.output

        result = _invoke("logs", "purge", "--matching", name.lower(), "--db", url)
        assert result.exit_code == 0 and "dry run" in result.output and "--yes" in result.output
        assert name.lower() not in result.output.lower()
        assert store.count_prompts(url) == 3

        result = _invoke("logs", "purge", "--matching", name, "--yes", "--db", url)
        assert result.exit_code == 0, result.output
        assert name not in result.output and name not in caplog.text
        assert store.count_prompts(url) == 2
        result = _invoke(
            "logs", "purge", "--route", "code", "--before", "2026-12-31", "--yes", "--db", url
        )
        assert result.exit_code == 0 and store.count_prompts(url) == 1
    finally:
        db.dispose_engines()
