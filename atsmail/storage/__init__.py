"""Persistence: models, repositories, migrations and the service layer."""

from atsmail.storage.capture import Capture, CaptureWriter, Prepared
from atsmail.storage.store import Store, UserError

__all__ = ["Capture", "CaptureWriter", "Prepared", "Store", "UserError"]
