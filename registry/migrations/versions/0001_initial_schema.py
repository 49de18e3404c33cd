"""Initial schema: prompt logs, calibration sets and members, rollouts, stage results, alias moves.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-23 15:21:23.449311

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Self-contained on purpose: a revision must not import the live models, which keep changing.
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create every table of the first release."""
    op.create_table(
        "calibration_sets",
        sa.Column("id", BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("filters", JSON_TYPE, nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("holdout_size", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("summary", JSON_TYPE, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_sets")),
        sa.UniqueConstraint("digest", name=op.f("uq_calibration_sets_digest")),
    )
    op.create_table(
        "prompt_logs",
        sa.Column("id", BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("content_digest", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("route", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("messages", JSON_TYPE, nullable=True),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=False),
        sa.Column("source_line", sa.Integer(), nullable=True),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "messages IS NOT NULL OR prompt_text IS NOT NULL",
            name=op.f("ck_prompt_logs_has_prompt"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_logs")),
        sa.UniqueConstraint("content_digest", name=op.f("uq_prompt_logs_content_digest")),
    )
    op.create_index("ix_prompt_logs_received_at", "prompt_logs", ["received_at"], unique=False)
    op.create_index("ix_prompt_logs_route", "prompt_logs", ["route"], unique=False)

    op.create_table(
        "calibration_set_members",
        sa.Column("calibration_set_id", BIGINT_ID, nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "calibration",
                "holdout",
                name="member_role",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("prompt_log_id", BIGINT_ID, nullable=False),
        sa.Column("route", sa.String(length=128), nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("redacted_text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["calibration_set_id"],
            ["calibration_sets.id"],
            name=op.f("fk_calibration_set_members_calibration_set_id_calibration_sets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["prompt_log_id"],
            ["prompt_logs.id"],
            name=op.f("fk_calibration_set_members_prompt_log_id_prompt_logs"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint(
            "calibration_set_id", "role", "position", name=op.f("pk_calibration_set_members")
        ),
        sa.UniqueConstraint(
            "calibration_set_id",
            "prompt_log_id",
            name=op.f("uq_calibration_set_members_calibration_set_id_prompt_log_id"),
        ),
    )
    op.create_index(
        "ix_calibration_set_members_prompt_log_id",
        "calibration_set_members",
        ["prompt_log_id"],
        unique=False,
    )

    op.create_table(
        "rollouts",
        sa.Column("id", BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("model_name", sa.String(length=256), nullable=False),
        sa.Column("candidate_version", sa.String(length=64), nullable=False),
        sa.Column("baseline_version", sa.String(length=64), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "running",
                "paused",
                "promoted",
                "rolled_back",
                "aborted",
                "failed",
                name="rollout_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("stages", JSON_TYPE, nullable=False),
        sa.Column("current_stage", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("calibration_set_id", BIGINT_ID, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["calibration_set_id"],
            ["calibration_sets.id"],
            name=op.f("fk_rollouts_calibration_set_id_calibration_sets"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index(
        "ix_rollouts_model_name_created_at", "rollouts", ["model_name", "created_at"], unique=False
    )
    op.create_index(
        "uq_rollouts_one_active_per_model",
        "rollouts",
        ["model_name"],
        unique=True,
        sqlite_where=sa.text("status IN ('pending', 'running', 'paused')"),
        postgresql_where=sa.text("status IN ('pending', 'running', 'paused')"),
    )

    op.create_table(
        "alias_moves",
        sa.Column("id", BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("model_name", sa.String(length=256), nullable=False),
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("from_version", sa.String(length=64), nullable=True),
        sa.Column("to_version", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("rollout_id", BIGINT_ID, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_alias_moves_rollout_id_rollouts"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_moves")),
    )
    op.create_index(
        "ix_alias_moves_model_name_alias", "alias_moves", ["model_name", "alias"], unique=False
    )

    op.create_table(
        "stage_results",
        sa.Column("id", BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("rollout_id", BIGINT_ID, nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("traffic_percent", sa.Float(), nullable=False),
        sa.Column("metric", sa.String(length=128), nullable=False),
        sa.Column("n_baseline", sa.Integer(), nullable=False),
        sa.Column("n_candidate", sa.Integer(), nullable=False),
        sa.Column("baseline_stat", sa.Float(), nullable=True),
        sa.Column("candidate_stat", sa.Float(), nullable=True),
        sa.Column("test_statistic", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column(
            "verdict",
            sa.Enum(
                "pass",
                "marginal",
                "fail",
                "inconclusive",
                name="stage_verdict",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("details", JSON_TYPE, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_stage_results_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stage_results")),
    )
    op.create_index(
        "ix_stage_results_rollout_id_stage", "stage_results", ["rollout_id", "stage"], unique=False
    )


def downgrade() -> None:
    """Drop every table (data loss)."""
    op.drop_index("ix_stage_results_rollout_id_stage", table_name="stage_results")

    op.drop_table("stage_results")
    op.drop_index("ix_alias_moves_model_name_alias", table_name="alias_moves")

    op.drop_table("alias_moves")
    op.drop_index(
        "uq_rollouts_one_active_per_model",
        table_name="rollouts",
        sqlite_where=sa.text("status IN ('pending', 'running', 'paused')"),
        postgresql_where=sa.text("status IN ('pending', 'running', 'paused')"),
    )
    op.drop_index("ix_rollouts_model_name_created_at", table_name="rollouts")

    op.drop_table("rollouts")
    op.drop_index("ix_calibration_set_members_prompt_log_id", table_name="calibration_set_members")

    op.drop_table("calibration_set_members")
    op.drop_index("ix_prompt_logs_route", table_name="prompt_logs")
    op.drop_index("ix_prompt_logs_received_at", table_name="prompt_logs")

    op.drop_table("prompt_logs")
    op.drop_table("calibration_sets")
