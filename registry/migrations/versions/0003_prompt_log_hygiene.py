"""Prompt-log hygiene: erasable raw text (``purged_at``) and a stored redaction per prompt.

Revision ID: 0003_prompt_log_hygiene
Revises: 0002

* ``purged_at``: ``fp4roll logs purge`` erases ``messages`` / ``prompt_text`` and stamps the row, so
  the "has a prompt" check now also accepts a purged row.
* ``redactor_version``, ``redacted_text``, ``redacted_messages``, ``redaction_counts``: the prompt
  redacted once (keyed by the redactor's version) instead of on every sampling run.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision: str = "0003_prompt_log_hygiene"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_CHECK = "messages IS NOT NULL OR prompt_text IS NOT NULL"
NEW_CHECK = "messages IS NOT NULL OR prompt_text IS NOT NULL OR purged_at IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("prompt_logs") as batch:
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("redactor_version", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("redacted_text", sa.Text(), nullable=True))
        batch.add_column(sa.Column("redacted_messages", JSON_TYPE, nullable=True))
        batch.add_column(sa.Column("redaction_counts", JSON_TYPE, nullable=True))
        batch.drop_constraint(op.f("ck_prompt_logs_has_prompt"), type_="check")
        batch.create_check_constraint(op.f("ck_prompt_logs_has_prompt"), sa.text(NEW_CHECK))


def downgrade() -> None:
    # Purged rows have no text left to satisfy the old check: they cannot go back.
    op.execute(
        "DELETE FROM calibration_set_members WHERE prompt_log_id IN "
        "(SELECT id FROM prompt_logs WHERE purged_at IS NOT NULL)"
    )
    op.execute("DELETE FROM prompt_logs WHERE purged_at IS NOT NULL")
    with op.batch_alter_table("prompt_logs") as batch:
        batch.drop_constraint(op.f("ck_prompt_logs_has_prompt"), type_="check")
        batch.create_check_constraint(op.f("ck_prompt_logs_has_prompt"), sa.text(OLD_CHECK))
        for column in (
            "redaction_counts",
            "redacted_messages",
            "redacted_text",
            "redactor_version",
            "purged_at",
        ):
            batch.drop_column(column)
