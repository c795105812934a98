"""Retention: captured mail is kept `[capture] retention_days`, and every purge
is on the record.

One function serves `atsmail purge` and the gateway's daily run, so both
purge alike and both leave the same audit entry.
"""

from __future__ import annotations

from datetime import datetime

from atsmail.storage.access import Access
from atsmail.storage.store import PurgeResult, Store


async def apply_retention(store: Store, retention_days: int, actor: str,
                          now: datetime | None = None) -> PurgeResult:
    """Purge what is older than `retention_days` and write it to the audit log as `actor`."""
    result = await store.purge(retention_days, now)
    await Access(store.db).record(actor, "retention.purge", "",
                                  retention_days=retention_days, **result.to_json())
    return result
