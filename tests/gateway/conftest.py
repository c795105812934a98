"""What the gateway tests share: the HTTP API on a running gateway, with a token per role."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from atsmail.config import ApiConfig
from atsmail.gateway.server import Gateway
from atsmail.storage import Store
from atsmail.storage.access import Access
from tests.conftest import GatewayFactory, smtp_send

ADMIN, RITA, CORA, SAM = ("admin@example.com", "recruiter@example.com", "cora@example.com",
                          "sam@example.com")


@dataclass
class Api:
    gateway: Gateway
    store: Store
    client: httpx.AsyncClient
    tokens: dict[str, str]

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def get(self, path: str, who: str = ADMIN, **kw: Any) -> httpx.Response:
        return await self.client.get(path, headers={**self.auth(who), **kw.pop("headers", {})},
                                     **kw)

    async def put(self, path: str, body: Any, who: str = ADMIN) -> httpx.Response:
        return await self.client.put(path, json=body, headers=self.auth(who))

    async def post(self, path: str, body: Any, who: str = ADMIN) -> httpx.Response:
        return await self.client.post(path, json=body, headers=self.auth(who))

    async def delete(self, path: str, who: str = ADMIN) -> httpx.Response:
        return await self.client.delete(path, headers=self.auth(who))

    async def relay(self, raw: bytes, mail_from: str, rcpts: list[str]) -> None:
        result = await smtp_send(self.gateway.relay.port, raw, mail_from, rcpts)
        assert result.code == 250, result

    async def audit(self) -> list[tuple[str, str, str]]:
        return [(e.actor, e.action, e.target) for e in await Access(self.store.db).audit(500)]


@pytest.fixture
async def api(gateway_factory: GatewayFactory, team: Store) -> AsyncIterator[Api]:
    gateway = await gateway_factory(api=ApiConfig(listen_host="127.0.0.1", listen_port=0,
                                                  max_body=64 * 1024))
    assert gateway.http is not None
    access = Access(team.db)
    tokens = {}
    await team.add_team_member(ADMIN, "Ada Admin", "admin")
    await team.add_team_member(CORA, "Cora Compliance", "compliance")
    await team.add_team_member(SAM, "Sam Second", "recruiter")
    for who in (ADMIN, RITA, CORA, SAM):
        tokens[who] = (await access.create_token(who, "test"))[1]
    await gateway.relay.refresh_directory()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http.port}",
                                 timeout=10) as client:
        yield Api(gateway, team, client, tokens)
