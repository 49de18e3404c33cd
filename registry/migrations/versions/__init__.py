"""Alembic revision scripts (one chain; never edit a shipped revision, add a new one)."""
