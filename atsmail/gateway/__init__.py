"""The I/O edges: the SMTP relay and its upstream."""
