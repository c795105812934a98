"""The API against its own OpenAPI document: schemathesis drives the real gateway.

Every operation gets generated valid and invalid requests; every answer must
be documented, match its schema and never be a 5xx. The run is bounded in
examples and time; the seed is fixed so a red run reproduces (set
ATSMAIL_SCHEMATHESIS_SEED to explore others).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from atsmail.config import ApiConfig
from atsmail.storage import Store
from atsmail.storage.access import Access
from tests.conftest import GatewayFactory, make_mail, require_peer, smtp_send

SEED = os.environ.get("ATSMAIL_SCHEMATHESIS_SEED", "20261128")
ADMIN = "admin@example.com"
CONFIG = Path(__file__).with_name("schemathesis.toml")


def _schemathesis() -> str | None:
    beside = Path(sys.executable).with_name("schemathesis")
    return str(beside) if beside.exists() else shutil.which("schemathesis")


async def test_every_operation_holds_to_the_openapi_document(
        gateway_factory: GatewayFactory, team: Store, tmp_path: Path) -> None:
    command = _schemathesis()
    require_peer(command is not None, "schemathesis is not installed (pip install '.[test]')")
    assert command is not None
    gateway = await gateway_factory(api=ApiConfig(listen_host="127.0.0.1", listen_port=0,
                                                  max_body=64 * 1024))
    assert gateway.http is not None
    await team.add_team_member(ADMIN, "Ada Admin", "admin")
    _, token = await Access(team.db).create_token(ADMIN, "schema test")
    await gateway.relay.refresh_directory()
    # Something to find: a candidate with a captured thread.
    result = await smtp_send(gateway.relay.port, make_mail("ada@applicant.test",
                                                            "recruiter@example.com", "Hello"),
                             "ada@applicant.test", ["recruiter@example.com"])
    assert result.code == 250

    process = await asyncio.create_subprocess_exec(
        command, "--config-file", str(CONFIG),
        "run", f"http://127.0.0.1:{gateway.http.port}/api/openapi.json",
        "--header", f"Authorization: Bearer {token}", "--max-examples", "10", "--max-time", "45",
        "--seed", SEED, "--generation-database", "none", "--no-color",
        "--report-dir", str(tmp_path / "report"),
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
    if process.returncode != 0:
        pytest.fail(output.decode(errors="replace")[-8000:])
