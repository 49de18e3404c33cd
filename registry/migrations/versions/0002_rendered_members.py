"""Calibration sets as the server sees them: rendered member prompts and a sensitivity role.

* ``calibration_set_members.rendered_text``: the redacted prompt rendered as the server sees it (chat
  requests through the model's chat template); ``templated`` says it came out of a template (so it is
  tokenized without adding special tokens again). ``redacted_text`` keeps the flattened text (drift,
  audit). Rows of earlier sets have no rendered text; readers fall back to ``redacted_text``.
* role ``sensitivity``: prompts that score each group and verify the plan, disjoint from the
  calibration prompts (activation statistics) and the canary hold-out.
* ``calibration_sets.sensitivity_size``.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROLE_CHECK = "ck_calibration_set_members_member_role"


def upgrade() -> None:
    with op.batch_alter_table("calibration_set_members") as batch:
        batch.add_column(sa.Column("rendered_text", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("templated", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.drop_constraint(op.f(_ROLE_CHECK), type_="check")
        batch.create_check_constraint(
            "member_role", "role IN ('calibration', 'sensitivity', 'holdout')"
        )
    with op.batch_alter_table("calibration_sets") as batch:
        batch.add_column(
            sa.Column("sensitivity_size", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    op.execute("DELETE FROM calibration_set_members WHERE role = 'sensitivity'")
    with op.batch_alter_table("calibration_sets") as batch:
        batch.drop_column("sensitivity_size")
    with op.batch_alter_table("calibration_set_members") as batch:
        batch.drop_constraint(op.f(_ROLE_CHECK), type_="check")
        batch.create_check_constraint("member_role", "role IN ('calibration', 'holdout')")
        batch.drop_column("templated")
        batch.drop_column("rendered_text")
