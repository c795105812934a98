"""Persistence: models, repositories, migrations and the service layer."""

from atsmail.storage.capture import Capture, CaptureWriter, Prepared
from atsmail.storage.store import BadInput, NotFound, Refused, Store, UserError

__all__ = ["BadInput", "Capture", "CaptureWriter", "NotFound", "Prepared", "Refused", "Store",
           "UserError"]
