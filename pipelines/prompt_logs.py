"""Glue between the prompt-log store (``registry``) and sampling / drift (``calibration``).

Plain functions with pydantic parameter models; the CLI (``pipelines/cli_logs.py``) and the Prefect
flows call these. Nothing here logs prompt text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from calibration.atomic import atomic_dir
from calibration.config import SamplingConfig
from calibration.drift import DriftThresholds, DriftVerdict, compare
from calibration.prompts import PromptRenderer, RenderedPrompt
from calibration.redaction import REDACTOR_VERSION, RedactedPrompt, redact_prompt
from calibration.sampling import CalibrationSample, PromptRecord, Role, sample_calibration_set
from registry import db
from registry import prompt_logs as store

logger = logging.getLogger(__name__)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


class DriftParameters(BaseModel):
    """Parameters of a drift check; default window: the 7 days before the newest logged prompt."""

    model_config = ConfigDict(frozen=True)

    calibration_set: str = Field(..., description="digest (or a >= 6-character prefix)")
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    window_days: float = Field(7.0, gt=0)
    js_threshold: float = Field(0.1, gt=0, le=1)
    psi_threshold: float = Field(0.2, gt=0)
    min_samples: int = Field(50, ge=1)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        return _aware(value)


@dataclass(frozen=True)
class SampleOutcome:
    digest: str
    created: bool  # False: an identical set was already stored
    calibration_set_id: int
    size: int
    sensitivity_size: int
    holdout_size: int
    summary: dict[str, Any]


def to_prompt_record(prompt: store.LoggedPrompt) -> PromptRecord:
    """A stored prompt for sampling, with its stored redaction when the current redactor made it
    from the content as it is now."""
    redaction = None
    current = prompt.redactor_version == REDACTOR_VERSION and prompt.redacted_text is not None
    if current and prompt.content_intact:
        redaction = RedactedPrompt(
            prompt.redacted_text,
            None if prompt.redacted_messages is None else tuple(prompt.redacted_messages),
            dict(prompt.redaction_counts or {}),
        )
    return PromptRecord(
        id=prompt.id,
        received_at=prompt.received_at,
        route=prompt.route,
        model=prompt.model,
        text=prompt.text,
        token_count=prompt.token_count,
        source=prompt.source,
        messages=prompt.messages,
        redaction=redaction,
    )


def store_redactions(db_url: str | None = None) -> int:
    """Redact every stored prompt that lacks the current redactor's result, once, and keep it
    beside the raw text (sampling and drift then reuse it). Returns how many were redacted."""
    return store.store_redactions(db_url, redact_prompt=redact_prompt, version=REDACTOR_VERSION)


def import_logs(paths: Iterable[str | Path], db_url: str | None = None, **kwargs: Any):
    """Create the schema if needed, then import JSONL files (``registry.prompt_logs.import_files``)."""
    db.ensure_schema(db_url)
    return store.import_files(paths, db_url, **kwargs)


def sample(
    config: SamplingConfig, renderer: PromptRenderer, db_url: str | None = None
) -> CalibrationSample:
    """Sample (without storing) from the store's window, rendering with ``renderer``. Prompts
    imported without their redaction are redacted (and stored) first."""
    db.ensure_schema(db_url)
    store_redactions(db_url)
    since = default_window_start(config, db_url)
    records = (
        to_prompt_record(p)
        for p in store.fetch_window(db_url, since=since, until=config.until, routes=config.routes)
    )
    return sample_calibration_set(records, config, renderer)


#: Without ``since``, sampling reads the last 30 days of logs (before ``until`` or the newest stored
#: prompt), not the whole store: production logs grow without bound.
DEFAULT_WINDOW = dt.timedelta(days=30)


def default_window_start(config: SamplingConfig, db_url: str | None = None) -> dt.datetime | None:
    """``config.since``, or :data:`DEFAULT_WINDOW` before ``config.until`` (or the newest stored
    prompt). None only when the store is empty."""
    if config.since is not None:
        return config.since
    end = config.until or store.time_range(db_url)[1]
    return None if end is None else end - DEFAULT_WINDOW


def sample_and_store(
    config: SamplingConfig, renderer: PromptRenderer, db_url: str | None = None
) -> SampleOutcome:
    """Sample calibration, sensitivity and hold-out prompts and record them (redacted and rendered
    members, digest, summary)."""
    result = sample(config, renderer, db_url)
    since = default_window_start(config, db_url)
    filters = {
        "since": since.isoformat() if since else None,
        "until": config.until.isoformat() if config.until else None,
        "routes": list(config.routes) if config.routes else None,
        "strata": ["route", "length_bucket"],
        "length_edges": list(config.length_edges),
        "near_duplicate_threshold": config.near_duplicate_threshold,
        "renderer": renderer.identity,
    }
    members = [
        store.CalibrationMemberRow(
            prompt_log_id=m.prompt_id,
            role=m.role.value,
            position=m.position,
            route=m.route,
            token_count=m.token_count,
            redacted_text=m.text,
            rendered_text=m.rendered.text,
            templated=m.rendered.templated,
        )
        for m in result.members
    ]
    stored, created = store.save_calibration_set(
        digest=result.digest,
        filters=filters,
        seed=config.seed,
        summary=dict(result.summary),
        members=members,
        url=db_url,
    )
    return SampleOutcome(
        digest=stored.digest,
        created=created,
        calibration_set_id=stored.id,
        size=stored.size,
        sensitivity_size=stored.sensitivity_size,
        holdout_size=stored.holdout_size,
        summary=dict(stored.summary),
    )


@dataclass(frozen=True)
class _Member:
    text: str
    route: str
    token_count: int


def _redacted(record: PromptRecord) -> RedactedPrompt:
    return record.redaction or redact_prompt(record.messages or None, record.text)


def reference_samples(calibration_set: store.StoredCalibrationSet) -> Sequence[_Member]:
    """All members (calibration and hold-out) of a stored set, as drift reference samples."""
    return [_Member(m.redacted_text, m.route, m.token_count) for m in calibration_set.members]


def check_drift(params: DriftParameters, db_url: str | None = None) -> DriftVerdict:
    """Compare a recent window of logs with a stored calibration set (read only: the schema must be
    current, ``registry.db.require_schema``)."""
    db.require_schema(db_url)
    calibration_set = store.load_calibration_set(params.calibration_set, db_url)
    since, until = params.since, params.until
    if since is None:
        _, newest = store.time_range(db_url)
        end = until or newest
        since = end - dt.timedelta(days=params.window_days) if end else None
    recent = [
        _Member(_redacted(record).text, record.route, record.token_count)
        for record in map(to_prompt_record, store.fetch_window(db_url, since=since, until=until))
    ]
    verdict = compare(
        reference_samples(calibration_set),
        recent,
        DriftThresholds(
            js=params.js_threshold, psi=params.psi_threshold, min_samples=params.min_samples
        ),
        redact_recent=False,  # redacted above: the stored redaction, or now
    )
    logger.info(
        "drift of %d recent prompts vs set %s: drifted=%s %s",
        verdict.n_recent,
        calibration_set.digest[:12],
        verdict.drifted,
        dict(verdict.metrics),
    )
    return verdict


def calibration_prompts(
    digest: str, db_url: str | None = None, role: Role = Role.CALIBRATION
) -> list[RenderedPrompt]:
    """The REDACTED prompts of a stored set's ``role``, in order, as the server sees them (a set
    sampled before rendering gives its flattened texts as plain prompts)."""
    return [prompt for prompt, _ in calibration_prompts_with_routes(digest, db_url, role)]


def calibration_prompts_with_routes(
    digest: str, db_url: str | None = None, role: Role = Role.CALIBRATION
) -> list[tuple[RenderedPrompt, str]]:
    """:func:`calibration_prompts` with each member's route, in order (the live canary judges per
    route)."""
    role = Role(role)
    members = store.load_calibration_set(digest, db_url).role(role.value)
    return [(RenderedPrompt(m.prompt_text, templated=m.templated), m.route) for m in members]


def export_calibration_set(digest: str, out_dir: str | Path, db_url: str | None = None) -> Path:
    """Write ``calibration_set.json`` (digest, filters, summary) and ``members.jsonl`` (redacted).

    Atomic: written to a temp folder beside ``out_dir`` and renamed; an existing ``out_dir`` is
    refused. Returns ``out_dir``. Meant as an MLflow artifact / audit record.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; refusing to overwrite")
    stored = store.load_calibration_set(digest, db_url)
    header = {
        "digest": stored.digest,
        "created_at": stored.created_at.isoformat(),
        "size": stored.size,
        "sensitivity_size": stored.sensitivity_size,
        "holdout_size": stored.holdout_size,
        "seed": stored.seed,
        "filters": dict(stored.filters),
        "summary": dict(stored.summary),
    }
    members = [
        {
            "role": m.role,
            "position": m.position,
            "route": m.route,
            "text": m.redacted_text,
            "rendered_text": m.rendered_text,
            "templated": m.templated,
        }
        for m in stored.members
    ]
    with atomic_dir(out_dir) as tmp:
        (tmp / "calibration_set.json").write_text(
            json.dumps(header, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        (tmp / "members.jsonl").write_text(
            "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in members),
            encoding="utf-8",
        )
    return out_dir


class PurgeParameters(BaseModel):
    """What ``purge_logs`` erases (filters combine with AND; at least one is required).

    ``matching`` is a ``SecretStr``: the text to erase is usually the PII itself, so it never shows
    in a repr, a log line or a Prefect parameter view.
    """

    model_config = ConfigDict(frozen=True)

    before: dt.datetime | None = Field(None, description="erase prompts received before this time")
    routes: tuple[str, ...] | None = Field(None, description="erase prompts of these routes")
    matching: SecretStr | None = Field(None, description="erase prompts whose text contains this")
    regex: bool = Field(False, description="treat 'matching' as a regular expression")
    dry_run: bool = Field(True, description="only count (the default); False erases")

    @field_validator("before")
    @classmethod
    def _utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        return _aware(value)

    @model_validator(mode="after")
    def _some_filter(self) -> PurgeParameters:
        if self.before is None and not self.routes and self.matching is None:
            raise ValueError("give at least one filter: before, routes or matching")
        return self


def purge_logs(params: PurgeParameters, db_url: str | None = None) -> store.PurgeReport:
    """Erase raw prompt text from the store (``registry.prompt_logs.purge_prompts``); calibration
    sets keep their digests and redacted member texts."""
    db.ensure_schema(db_url)
    return store.purge_prompts(
        db_url,
        before=params.before,
        routes=params.routes,
        matching=params.matching.get_secret_value() if params.matching is not None else None,
        regex=params.regex,
        dry_run=params.dry_run,
    )
