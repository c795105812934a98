"""Logins for connected mailboxes, against the local token service.

The mirror's and the sender's tests show tokens at work on real servers;
these look at what only the token endpoint sees: caching, rotation, and
the errors an admin is shown.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from atsmail.config import Config, OAuthConfig, SecretsConfig, StorageConfig
from atsmail.gateway.credentials import Credentials, CredentialsError, CredentialsRefusedError
from atsmail.secrets import Secrets
from atsmail.storage import Store
from atsmail.storage.mailboxes import Account, Mailboxes
from tests.dovecot import free_port
from tests.oauth import TokenService

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

ADDRESS = "recruiter@example.com"


async def connected(store: Store, secrets: SecretsConfig, refresh_token: str) -> None:
    await Mailboxes(store.db).connect(Account(
        address=ADDRESS, provider="gmail", owner=ADDRESS, shared=False, visible_to=[],
        imap_host="127.0.0.1", imap_port=1, smtp_host="", smtp_port=0, security="ssl",
        username=ADDRESS, sealed_secret=Secrets.load(secrets).seal(refresh_token),
        auth="oauth2"))


def credentials(store: Store, store_url: str, secrets: SecretsConfig,
                oauth: OAuthConfig) -> Credentials:
    config = Config(storage=StorageConfig(store_url), secrets=secrets, oauth=oauth)
    return Credentials(config, Mailboxes(store.db))


async def test_a_token_is_cached_until_it_is_due_and_a_rotated_one_is_kept(
        team: Store, store_url: str, secrets_config: SecretsConfig, oauth_config: OAuthConfig,
        token_service: TokenService) -> None:
    first = token_service.grant(ADDRESS)
    await connected(team, secrets_config, first)
    logins = credentials(team, store_url, secrets_config, oauth_config)
    box = await Mailboxes(team.db).get(ADDRESS)
    one, two = await logins.login(box), await logins.login(box)
    assert (one.oauth2, one.cached, two.cached) == (True, False, True)
    assert one.secret == two.secret and token_service.account_of(one.secret) == ADDRESS
    assert token_service.refreshes.count(ADDRESS) == 1

    # A provider that rotates refresh tokens: the new one replaces the stored one.
    token_service.rotate = True
    await credentials(team, store_url, secrets_config, oauth_config).login(box)
    stored = Secrets.load(secrets_config).open((await Mailboxes(team.db).get(ADDRESS)).secret)
    assert stored != first and token_service.grants.get(stored) == ADDRESS
    assert first not in token_service.grants
    # The rotated token is the one refreshed with next, though the caller's
    # copy of the mailbox holds the old one (which would now be refused).
    await credentials(team, store_url, secrets_config, oauth_config).login(box)
    assert token_service.refreshes.count(ADDRESS) == 3


async def test_a_refused_client_and_an_unreachable_endpoint_say_so(
        team: Store, store_url: str, secrets_config: SecretsConfig, oauth_config: OAuthConfig,
        token_service: TokenService, monkeypatch: pytest.MonkeyPatch) -> None:
    await connected(team, secrets_config, token_service.grant(ADDRESS))
    box = await Mailboxes(team.db).get(ADDRESS)

    monkeypatch.setenv("ATSMAIL_TEST_CLIENT_SECRET", "not-the-secret")
    with pytest.raises(CredentialsRefusedError, match=r"refused the client \(invalid_client.*"
                                                      r"check \[oauth.gmail\] client_id"):
        await credentials(team, store_url, secrets_config, oauth_config).login(box)
    monkeypatch.delenv("ATSMAIL_TEST_CLIENT_SECRET")
    with pytest.raises(CredentialsRefusedError, match=r"ATSMAIL_TEST_CLIENT_SECRET.*not set"):
        await credentials(team, store_url, secrets_config, oauth_config).login(box)

    nowhere = replace(oauth_config.gmail, token_url=f"http://127.0.0.1:{free_port()}/token",
                      client_secret_env="")
    with pytest.raises(CredentialsError, match="cannot reach the gmail token endpoint") as exc:
        await credentials(team, store_url, secrets_config,
                          replace(oauth_config, gmail=nowhere)).login(box)
    assert not isinstance(exc.value, CredentialsRefusedError)  # tried again later

    unset = OAuthConfig()
    with pytest.raises(CredentialsRefusedError, match=r"set \[oauth.gmail\] client_id"):
        await credentials(team, store_url, secrets_config, unset).login(box)


async def test_a_password_mailbox_logs_in_with_its_password(
        team: Store, store_url: str, secrets_config: SecretsConfig) -> None:
    await Mailboxes(team.db).connect(Account(
        address=ADDRESS, provider="imap", owner=ADDRESS, shared=False, visible_to=[],
        imap_host="127.0.0.1", imap_port=1, smtp_host="", smtp_port=0, security="ssl",
        username="rita", sealed_secret=Secrets.load(secrets_config).seal("pw")))
    box = await Mailboxes(team.db).get(ADDRESS)
    login = await credentials(team, store_url, secrets_config, OAuthConfig()).login(box)
    assert (login.username, login.secret, login.oauth2) == ("rita", "pw", False)
    assert "pw" not in repr(login)
