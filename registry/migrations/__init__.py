"""Alembic migrations of the fp4roll store (run through ``registry.db.upgrade``)."""
