"""Mailbox passwords and tokens, encrypted at rest with a key kept out of the store.

The key is a Fernet key (AES-128-CBC with HMAC-SHA256, from `cryptography`)
read from an environment variable, else from a key file that `atsmail init`
creates with mode 0600. The database only ever holds ciphertext.
"""

from __future__ import annotations

import os

from cryptography.fernet import Fernet, InvalidToken

from atsmail.config import SecretsConfig


class SecretError(Exception):
    """The key is missing or does not open what the store holds."""


def create_key_file(config: SecretsConfig) -> bool:
    """Create the key file if there is none; True when one was made."""
    if os.environ.get(config.key_env) or config.key_file.exists():
        return False
    config.key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(Fernet.generate_key() + b"\n")
    return True


class Secrets:
    def __init__(self, fernet: Fernet) -> None:
        self._fernet = fernet

    @classmethod
    def load(cls, config: SecretsConfig) -> Secrets:
        key = os.environ.get(config.key_env, "").encode()
        where = f"${config.key_env}"
        if not key:
            where = str(config.key_file)
            try:
                key = config.key_file.read_bytes().strip()
            except FileNotFoundError:
                raise SecretError(
                    f"no secret key: set {config.key_env} or run `atsmail init` to create "
                    f"{config.key_file}") from None
        try:
            return cls(Fernet(key))
        except ValueError:
            raise SecretError(f"the secret key in {where} is not a valid key") from None

    def seal(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def open(self, sealed: bytes) -> str:
        try:
            return self._fernet.decrypt(sealed).decode()
        except InvalidToken:
            raise SecretError("a stored secret does not open with this key (was the key "
                              "changed?)") from None
