"""atsmail: a mail gateway that captures candidate conversations for an ATS."""

__version__ = "0.1.0"
