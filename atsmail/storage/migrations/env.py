"""Alembic environment: runs on the connection `atsmail.storage.migrate` hands over."""

from __future__ import annotations

from alembic import context

from atsmail.storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `atsmail init`, which passes the connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
