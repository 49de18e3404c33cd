"""Traffic weights: the candidate's gateway weight journal (intent before, read-back after).

Revision ID: 0005_traffic_weights
Revises: 0004_rollout_ownership
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision: str = "0005_traffic_weights"
down_revision: str | Sequence[str] | None = "0004_rollout_ownership"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "traffic_weights",
        sa.Column("id", BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("rollout_id", BIGINT_ID, nullable=False),
        sa.Column("stage", sa.Integer(), nullable=True),
        sa.Column("candidate_percent", sa.Float(), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("router", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_traffic_weights_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_traffic_weights")),
    )
    op.create_index(
        "ix_traffic_weights_rollout_id", "traffic_weights", ["rollout_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_traffic_weights_rollout_id", table_name="traffic_weights")
    op.drop_table("traffic_weights")
