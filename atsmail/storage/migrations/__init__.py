"""Alembic migrations of the store; `atsmail init` applies them."""
