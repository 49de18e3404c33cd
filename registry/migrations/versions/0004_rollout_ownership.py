"""Rollout ownership and crash-consistent alias moves.

Revision ID: 0004_rollout_ownership
Revises: 0003_prompt_log_hygiene

* ``rollouts.owner`` / ``lease_expires_at``: the flow run driving a rollout and its heartbeat lease;
  another run is refused while the lease lives.
* ``rollouts.gate_policy_hash``: the gate policy pinned at creation (stages and baseline already are).
* ``alias_intents``: an alias action (promote / reject / rollback) recorded before MLflow aliases
  move, with the aliases before it; completed (``completed_at``) in the transaction that records
  the moves. At most one open intent per model.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision: str = "0004_rollout_ownership"
down_revision: str | Sequence[str] | None = "0003_prompt_log_hygiene"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("gate_policy_hash", sa.String(length=64), nullable=True))
    op.create_table(
        "alias_intents",
        sa.Column("id", BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("model_name", sa.String(length=256), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("rollout_id", BIGINT_ID, nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("before", JSON_TYPE, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_alias_intents_rollout_id_rollouts"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_intents")),
    )
    op.create_index(
        "uq_alias_intents_one_open_per_model",
        "alias_intents",
        ["model_name"],
        unique=True,
        sqlite_where=sa.text("completed_at IS NULL"),
        postgresql_where=sa.text("completed_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_alias_intents_one_open_per_model", table_name="alias_intents")
    op.drop_table("alias_intents")
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("gate_policy_hash")
        batch.drop_column("lease_expires_at")
        batch.drop_column("owner")
