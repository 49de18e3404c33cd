"""SQLAlchemy 2 models of the fp4roll store (prompt logs, calibration sets, rollout ledger).

The same models serve SQLite (default, one machine) and PostgreSQL (production). Alembic migrations
in ``registry/migrations`` create exactly these tables; change both together.

Timestamps are stored timezone-aware in UTC. SQLite has no time-zone type, so ``UTCDateTime`` attaches
UTC on the way out and refuses naive datetimes on the way in.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Rollout statuses that count as "active": at most one such rollout per model (partial unique index).
ACTIVE_ROLLOUT_STATUSES = ("pending", "running", "paused")


class RolloutStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    paused = "paused"
    promoted = "promoted"
    rolled_back = "rolled_back"
    aborted = "aborted"
    failed = "failed"


class StageVerdict(str, enum.Enum):
    passed = "pass"
    marginal = "marginal"
    failed = "fail"
    inconclusive = "inconclusive"


class MemberRole(str, enum.Enum):
    calibration = "calibration"  # activation statistics
    sensitivity = "sensitivity"  # group scores and plan verification
    holdout = "holdout"  # the canary's replay window


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(sa.types.TypeDecorator):
    """A tz-aware UTC datetime on every backend. Naive datetimes are rejected (ambiguous)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store timezone-aware datetimes only")
        value = value.astimezone(dt.timezone.utc)
        # SQLite stores text; drop the tzinfo so every row sorts and compares as plain UTC text.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


# JSON everywhere, JSONB on PostgreSQL.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# 64-bit ids on PostgreSQL; SQLite needs INTEGER PRIMARY KEY for its rowid alias / autoincrement.
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _enum(enum_cls: type[enum.Enum], name: str) -> sa.Enum:
    """A portable enum column: VARCHAR + CHECK constraint, storing the enum *values*."""
    return sa.Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class PromptLog(Base):
    """One production request, deduplicated by ``content_digest`` (prompt content + route).

    ``fp4roll logs purge`` erases the raw text (``messages``, ``prompt_text``) and the cached
    redaction of a row and stamps ``purged_at``; the row stays (digest, route, time, token count) so
    calibration-set members keep their reference and a re-import cannot bring the text back.
    """

    __tablename__ = "prompt_logs"
    __table_args__ = (
        sa.CheckConstraint(
            "messages IS NOT NULL OR prompt_text IS NOT NULL OR purged_at IS NOT NULL",
            name="has_prompt",
        ),
        sa.Index("ix_prompt_logs_received_at", "received_at"),
        sa.Index("ix_prompt_logs_route", "route"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    # SHA-256 hex over canonical JSON of {"route", "messages" | "text"}; unique => re-import is a no-op.
    content_digest: Mapped[str] = mapped_column(sa.String(64), unique=True, nullable=False)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    route: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    model: Mapped[str | None] = mapped_column(sa.String(256))
    # Chat requests: [{"role": ..., "content": str}, ...]; plain prompts: prompt_text.
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    prompt_text: Mapped[str | None] = mapped_column(sa.Text)
    # Approximate: regex count of word runs and single punctuation marks (not a model tokenizer).
    token_count: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    source: Mapped[str] = mapped_column(sa.String(1024), nullable=False)
    source_line: Mapped[int | None] = mapped_column(sa.Integer)
    imported_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    # Set when the raw text was erased (``registry.prompt_logs.purge_prompts``).
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # The prompt redacted once and kept (``registry.prompt_logs.store_redactions``), keyed by the
    # redactor's version: a newer redactor recomputes it. Chat prompts: redacted messages.
    redactor_version: Mapped[str | None] = mapped_column(sa.String(64))
    redacted_text: Mapped[str | None] = mapped_column(sa.Text)
    redacted_messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    redaction_counts: Mapped[dict[str, int] | None] = mapped_column(JSONType)


class CalibrationSet(Base):
    """A sampled, redacted, deduplicated calibration set plus its disjoint canary hold-out."""

    __tablename__ = "calibration_sets"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    # SHA-256 hex over the ordered redacted member contents: the corpus hash later artifacts carry.
    digest: Mapped[str] = mapped_column(sa.String(64), unique=True, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    filters: Mapped[dict[str, Any]] = mapped_column(
        JSONType, nullable=False
    )  # window, routes, strata
    size: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    sensitivity_size: Mapped[int] = mapped_column(
        sa.Integer, nullable=False, default=0, server_default="0"
    )
    holdout_size: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    seed: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    summary: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)

    members: Mapped[list[CalibrationSetMember]] = relationship(
        back_populates="calibration_set",
        cascade="all, delete-orphan",
        order_by="(CalibrationSetMember.role, CalibrationSetMember.position)",
    )


class CalibrationSetMember(Base):
    """One member of a calibration set; only the REDACTED text is stored here."""

    __tablename__ = "calibration_set_members"
    __table_args__ = (
        sa.UniqueConstraint("calibration_set_id", "prompt_log_id"),
        sa.Index("ix_calibration_set_members_prompt_log_id", "prompt_log_id"),
    )

    calibration_set_id: Mapped[int] = mapped_column(
        BigIntId, sa.ForeignKey("calibration_sets.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[MemberRole] = mapped_column(_enum(MemberRole, "member_role"), primary_key=True)
    position: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    prompt_log_id: Mapped[int] = mapped_column(
        BigIntId, sa.ForeignKey("prompt_logs.id", ondelete="RESTRICT"), nullable=False
    )
    route: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    token_count: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    redacted_text: Mapped[str] = mapped_column(sa.Text, nullable=False)  # flattened (drift, audit)
    # As the server sees it (chat template applied); None for sets sampled before revision 0002.
    rendered_text: Mapped[str | None] = mapped_column(sa.Text)
    templated: Mapped[bool] = mapped_column(
        sa.Boolean, nullable=False, default=False, server_default=sa.false()
    )

    calibration_set: Mapped[CalibrationSet] = relationship(back_populates="members")


class Rollout(Base):
    """A staged canary of one candidate model version against a baseline version."""

    __tablename__ = "rollouts"
    __table_args__ = (
        # At most one active rollout per model, enforced by the database on both backends.
        sa.Index(
            "uq_rollouts_one_active_per_model",
            "model_name",
            unique=True,
            sqlite_where=sa.text("status IN ('pending', 'running', 'paused')"),
            postgresql_where=sa.text("status IN ('pending', 'running', 'paused')"),
        ),
        sa.Index("ix_rollouts_model_name_created_at", "model_name", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(sa.String(256), nullable=False)
    candidate_version: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    baseline_version: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[RolloutStatus] = mapped_column(
        _enum(RolloutStatus, "rollout_status"), nullable=False, default=RolloutStatus.pending
    )
    stages: Mapped[list[float]] = mapped_column(
        JSONType, nullable=False
    )  # traffic %, e.g. [1, 10, 50, 100]
    current_stage: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    reason: Mapped[str | None] = mapped_column(sa.Text)
    calibration_set_id: Mapped[int | None] = mapped_column(
        BigIntId, sa.ForeignKey("calibration_sets.id", ondelete="SET NULL")
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow
    )
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # The flow run driving the rollout and its heartbeat lease (another run is refused until then).
    owner: Mapped[str | None] = mapped_column(sa.String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # sha256 of the gate policy pinned at creation (stages and baseline_version are pinned too).
    gate_policy_hash: Mapped[str | None] = mapped_column(sa.String(64))

    stage_results: Mapped[list[StageResult]] = relationship(
        back_populates="rollout", cascade="all, delete-orphan", order_by="StageResult.id"
    )


class StageResult(Base):
    """One metric's judgement at one canary stage."""

    __tablename__ = "stage_results"
    __table_args__ = (sa.Index("ix_stage_results_rollout_id_stage", "rollout_id", "stage"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(
        BigIntId, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False
    )
    stage: Mapped[int] = mapped_column(sa.Integer, nullable=False)  # index into Rollout.stages
    traffic_percent: Mapped[float] = mapped_column(sa.Float, nullable=False)
    metric: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    n_baseline: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    n_candidate: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    baseline_stat: Mapped[float | None] = mapped_column(sa.Float)
    candidate_stat: Mapped[float | None] = mapped_column(sa.Float)
    test_statistic: Mapped[float | None] = mapped_column(sa.Float)
    p_value: Mapped[float | None] = mapped_column(sa.Float)
    verdict: Mapped[StageVerdict] = mapped_column(
        _enum(StageVerdict, "stage_verdict"), nullable=False
    )
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)

    rollout: Mapped[Rollout] = relationship(back_populates="stage_results")


class TrafficWeight(Base):
    """Journal of the candidate's traffic weight at the gateway: the intent before a change and the
    weight read back after it, so a rerun after a crash knows what the gateway should carry."""

    __tablename__ = "traffic_weights"
    __table_args__ = (sa.Index("ix_traffic_weights_rollout_id", "rollout_id"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(
        BigIntId, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False
    )
    stage: Mapped[int | None] = mapped_column(sa.Integer)
    candidate_percent: Mapped[float] = mapped_column(sa.Float, nullable=False)
    phase: Mapped[str] = mapped_column(sa.String(16), nullable=False)  # intent | applied
    router: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    reason: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class AliasMove(Base):
    """Ledger of MLflow alias changes (champion / challenger / previous-champion)."""

    __tablename__ = "alias_moves"
    __table_args__ = (sa.Index("ix_alias_moves_model_name_alias", "model_name", "alias"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(sa.String(256), nullable=False)
    alias: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    from_version: Mapped[str | None] = mapped_column(sa.String(64))
    to_version: Mapped[str | None] = mapped_column(sa.String(64))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    rollout_id: Mapped[int | None] = mapped_column(
        BigIntId, sa.ForeignKey("rollouts.id", ondelete="SET NULL")
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class AliasIntent(Base):
    """An alias action recorded BEFORE MLflow aliases move, completed in the transaction that
    records the moves: a crash in between is reconciled on the next entry (at most one open
    intent per model)."""

    __tablename__ = "alias_intents"
    __table_args__ = (
        sa.Index(
            "uq_alias_intents_one_open_per_model",
            "model_name",
            unique=True,
            sqlite_where=sa.text("completed_at IS NULL"),
            postgresql_where=sa.text("completed_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(sa.String(256), nullable=False)
    action: Mapped[str] = mapped_column(sa.String(16), nullable=False)  # promote|reject|rollback
    version: Mapped[str | None] = mapped_column(sa.String(64))  # promote/reject: the version
    rollout_id: Mapped[int | None] = mapped_column(
        BigIntId, sa.ForeignKey("rollouts.id", ondelete="SET NULL")
    )
    reason: Mapped[str] = mapped_column(sa.Text, nullable=False)
    before: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)  # alias -> version
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
