"""Shipped sample logs end to end: import -> sample -> disjoint hold-out -> digest, both backends."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time

import sqlalchemy as sa

from calibration.config import SamplingConfig
from calibration.data import SAMPLE_PROMPT_LOGS
from calibration.prompts import PromptRenderer, RenderedPrompt
from calibration.redaction import find_pii
from calibration.sampling import Role, near_duplicate_clusters, normalize_text
from pipelines import prompt_logs as logs
from registry import db
from registry import prompt_logs as store
from registry.schema import CalibrationSetMember, PromptLog

logger = logging.getLogger(__name__)
UTC = dt.timezone.utc
PARAMS = SamplingConfig(
    calibration_size=224,
    sensitivity_size=32,
    holdout_size=128,
    until=dt.datetime(2026, 1, 26, tzinfo=UTC),
    seed=0,
)
FLATTENED = PromptRenderer()  # no tokenizer here: chat requests are flattened
# The corpus hash of PARAMS over the shipped sample logs. It must be the same on every machine and
# backend; it changes only when the shipped data or the sampling algorithm changes (then update it
# deliberately, together with DIGEST_VERSION in calibration/sampling.py if the algorithm changed;
# the redactor's output is part of it: calibration.redaction.REDACTOR_VERSION).
GOLDEN_DIGEST = "06f26d4e3071be46cc34e79059cd8686474dc2c980abb02fe33881da9f9cd06b"


def test_shipped_logs_import_sample_holdout_and_digest(
    migrated_db_url: str, record_property, tmp_path
) -> None:
    started = time.perf_counter()
    report = store.import_files([SAMPLE_PROMPT_LOGS], migrated_db_url)
    elapsed = time.perf_counter() - started
    record_property("import_seconds", round(elapsed, 3))
    print(f"\nimported {report.lines} lines ({report.imported} new) in {elapsed:.2f} s")
    assert (report.lines, report.bad, report.exit_code) == (4000, 0, 0)
    assert report.imported == 3374 and report.duplicates == 626  # resent requests collapse
    routes = {r for (r,) in _rows(migrated_db_url, sa.select(PromptLog.route).distinct())}
    assert routes == {"chat-support", "code-help", "summarize", "extract-json", "translate"}

    first = logs.sample_and_store(PARAMS, FLATTENED, migrated_db_url)
    assert first.created and (first.size, first.sensitivity_size, first.holdout_size) == (
        224,
        32,
        128,
    )
    assert first.digest == GOLDEN_DIGEST
    stored = store.load_calibration_set(first.digest, migrated_db_url)
    calibration, holdout = stored.role("calibration"), stored.role("holdout")
    sensitivity = stored.role("sensitivity")
    roles = [{m.prompt_log_id for m in part} for part in (calibration, sensitivity, holdout)]
    assert sum(map(len, roles)) == len(set().union(*roles)) == 384  # three disjoint roles
    texts = [_without_system_message(m.redacted_text) for m in stored.members]
    clusters = near_duplicate_clusters([normalize_text(t) for t in texts], 0.8)
    assert len(set(clusters)) == len(texts)  # no near-duplicate pair anywhere, across the split too
    assert set(stored.summary["calibration"]["routes"]) == routes
    # Window respected.
    member_ids = [m.prompt_log_id for m in stored.members]
    for row in store.fetch_window(migrated_db_url, since=PARAMS.until):
        assert row.id not in member_ids

    # Redaction: nothing PII-shaped in the stored calibration set, although the logs are full of it.
    assert sum(stored.summary["redactions"].values()) > 1000
    stored_texts = [
        t for (t,) in _rows(migrated_db_url, sa.select(CalibrationSetMember.redacted_text))
    ]
    leaks = [(kind, span) for text in stored_texts for kind, span in find_pii(text)]
    assert leaks == []
    # Independent oracle: the formats calibration/data/make_sample_logs.py plants (PII.email,
    # .phone, .card, .api_key), written here from the generator, not from the redactor.
    planted = [
        (kind, m.group())
        for text in stored_texts
        for kind, pattern in PLANTED_FORMATS.items()
        for m in re.finditer(pattern, text)
    ]
    assert planted == []

    # Helpers later flows use: texts in order, and an atomic audit export.
    assert logs.calibration_prompts(first.digest, migrated_db_url) == [
        RenderedPrompt(m.rendered_text, m.templated) for m in calibration
    ]
    assert len(logs.calibration_prompts(first.digest, migrated_db_url, Role.HOLDOUT)) == 128
    exported = logs.export_calibration_set(first.digest, tmp_path / "set", migrated_db_url)
    header = json.loads((exported / "calibration_set.json").read_text())
    assert header["digest"] == first.digest and header["summary"] == stored.summary
    assert len((exported / "members.jsonl").read_text().splitlines()) == 384

    # Any content change changes the digest: edit one sampled prompt in the store.
    victim = calibration[0].prompt_log_id
    with db.session_scope(migrated_db_url) as session:
        row = session.get(PromptLog, victim)
        messages = [dict(m) for m in row.messages] if row.messages else None
        if messages:
            messages[-1]["content"] += " (edited)"
            row.messages = messages
        else:
            row.prompt_text += " (edited)"
    assert logs.sample(PARAMS, FLATTENED, migrated_db_url).digest != first.digest

    # Drift: the last week of the same logs against the set is no drift.
    verdict = logs.check_drift(
        logs.DriftParameters(calibration_set=first.digest[:10]), migrated_db_url
    )
    assert not verdict.drifted and not verdict.inconclusive, verdict.reasons


PLANTED_FORMATS = {
    "email": r"[\w.]+@[\w-]+\.[a-z]{2,}",
    "phone": r"\+1 415 555 \d{4}|\(\d{3}\) 555-\d{4}|\+49 30 \d{8}|\+33 6(?: \d\d){4}"
    r"|\+44 20 7946 \d{4}|555\.\d{3}\.\d{4}",
    "card": r"(?<![\d.])(?:4|5[15]|37)\d{2}([ -]?)\d{4}\1\d{4}\1\d{4}\b",
    "api_key": r"sk-proj-[A-Za-z0-9]{40}|AKIA[A-Z0-9]{16}|ghp_[A-Za-z0-9]{36}",
}


def _without_system_message(text: str) -> str:
    """Sampling deduplicates on the non-system messages (a route's system prompt is shared)."""
    if text.startswith("system: ") and "\n\nuser: " in text:
        return text.split("\n\nuser: ", 1)[1]
    return text


def _rows(url: str, stmt) -> list:
    with db.get_engine(url).connect() as conn:
        return list(conn.execute(stmt))


def test_sampling_reuses_the_stored_redaction_of_unchanged_prompts(migrated_db_url, tmp_path):
    """Each prompt is redacted once (at import) and sampling reuses that result; a stale version
    or a raw text changed since import is redacted again."""
    from calibration.redaction import REDACTOR_VERSION, RedactedPrompt

    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
        "nu",
        "xi",
    ]
    lines = [
        json.dumps(
            {"prompt": f"question about {words[i]} and {words[-i - 1]} please", "route": "r"}
        )
        for i in range(12)
    ]
    path = tmp_path / "logs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    store.import_files([path], migrated_db_url)

    def marker(messages, text):  # stands in for the real redactor: its output is recognisable
        return RedactedPrompt(f"[STORED] {text}", None, {"stored": 1})

    assert store.store_redactions(migrated_db_url, redact_prompt=marker, version=REDACTOR_VERSION)
    config = SamplingConfig(calibration_size=8, sensitivity_size=0, holdout_size=4)
    sample = logs.sample(config, FLATTENED, migrated_db_url)
    assert all(m.text.startswith("[STORED] question") for m in sample.members)
    assert sample.summary["redactions"] == {"stored": 12}

    stale = "fp4roll-redactor-0"
    assert store.store_redactions(migrated_db_url, redact_prompt=marker, version=stale) == 12
    again = logs.sample(config, FLATTENED, migrated_db_url)  # redacted again, and stored
    assert not any(m.text.startswith("[STORED]") for m in again.members)
    assert {p.redactor_version for p in store.fetch_window(migrated_db_url)} == {REDACTOR_VERSION}
