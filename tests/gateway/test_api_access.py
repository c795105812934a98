"""Every endpoint of the API, from its OpenAPI document, against callers it must refuse.

Missing, wrong, malformed and revoked tokens get 401 everywhere and change
nothing; each role gets 403 wherever it lacks the right, and the refusal is
audited. An endpoint the tables below do not name fails the test: a new one
must be placed in them.
"""

from __future__ import annotations

from typing import Any

import pytest

from atsmail.storage.access import Access
from atsmail.storage.outbox import Outbox
from tests.gateway.conftest import ADMIN, CORA, RITA, SAM, Api

# A value for each path parameter: things that exist in the test's store.
PARAMETERS = {"email": SAM, "job_id": "J1", "candidate_id": "C-1", "thread_id": "1",
              "message_pk": "1", "index": "0", "domain": "example.com"}
# A valid body where one is needed, so a refusal is never about the body.
BODIES: dict[tuple[str, str], Any] = {
    ("put", "/api/users/{email}"): {"name": "Sam", "role": "recruiter"},
    ("put", "/api/jobs/{job_id}"): {"title": "Backend Engineer", "archived": False},
    ("put", "/api/candidates/{candidate_id}"): {
        "name": "Ada Applicant", "emails": ["ada@applicant.test"], "jobs": ["J1"]},
    ("post", "/api/messages"): {"to": ["ada@applicant.test"], "subject": "Hi", "body": "Hello."},
    ("put", "/api/internal-domains/{domain}"): {},
}
# Who may call what, where not every role may.
EDITORS, AUDITORS = {ADMIN, RITA, SAM}, {ADMIN, CORA}  # Rita and Sam: recruiters
RESTRICTED = {
    ("put", "/api/users/{email}"): {ADMIN},
    ("delete", "/api/users/{email}"): {ADMIN},
    ("put", "/api/internal-domains/{domain}"): {ADMIN},
    ("delete", "/api/internal-domains/{domain}"): {ADMIN},
    ("put", "/api/jobs/{job_id}"): EDITORS,
    ("delete", "/api/jobs/{job_id}"): EDITORS,
    ("put", "/api/candidates/{candidate_id}"): EDITORS,
    ("post", "/api/messages"): EDITORS,
    ("delete", "/api/candidates/{candidate_id}"): {ADMIN, RITA, SAM, CORA},
    ("get", "/api/candidates/{candidate_id}/export"): AUDITORS,
    ("get", "/api/audit"): AUDITORS,
}
OPEN_TO_ALL = {
    ("get", "/api/users"), ("get", "/api/users/{email}"), ("get", "/api/jobs"),
    ("get", "/api/jobs/{job_id}"), ("get", "/api/candidates"),
    ("get", "/api/candidates/{candidate_id}"), ("get", "/api/candidates/{candidate_id}/threads"),
    ("get", "/api/threads/{thread_id}"), ("get", "/api/messages/{message_pk}/raw"),
    ("get", "/api/messages/{message_pk}/attachments"),
    ("get", "/api/messages/{message_pk}/attachments/{index}"), ("get", "/api/outbox"),
    ("get", "/api/internal-domains"), ("get", "/api/mailboxes"),
}


async def endpoints(api: Api) -> list[tuple[str, str]]:
    document = (await api.client.get("/api/openapi.json")).json()
    return sorted((method, path) for path, operations in document["paths"].items()
                  for method in operations)


async def call(api: Api, method: str, path: str, headers: dict[str, str]) -> int:
    url = path.format(**PARAMETERS)
    body = BODIES.get((method, path))
    response = await api.client.request(method.upper(), url, headers=headers,
                                        **({"json": body} if body is not None else {}))
    return response.status_code


async def snapshot(api: Api) -> tuple[Any, ...]:
    """What a refused call could have changed: candidates, team, domains, outbox, audit."""
    store, access = api.store, Access(api.store.db)
    return ([(c.id, c.name, c.emails) for c in await store.candidates()],
            [(m.email, m.name, m.role) for m in await store.team()],
            [d.domain for d in await store.domains()],
            [m.id for m in await Outbox(store.db).all()],
            [e.id for e in await access.audit(500)])


async def test_every_endpoint_is_in_the_tables(api: Api) -> None:
    assert set(await endpoints(api)) == set(RESTRICTED) | OPEN_TO_ALL


async def test_every_endpoint_refuses_callers_without_a_live_token(api: Api) -> None:
    access = Access(api.store.db)
    revoked_id, revoked = await access.create_token(ADMIN, "to be revoked")
    await access.revoke_token(revoked_id, "test")
    before = await snapshot(api)
    refused = {"none": {}, "wrong": {"Authorization": "Bearer atsm_not-a-token"},
               "malformed": {"Authorization": "Basic YWRtaW46YWRtaW4="},
               "empty": {"Authorization": "Bearer"},
               "revoked": {"Authorization": f"Bearer {revoked}"}}
    answers = {(method, path, kind): await call(api, method, path, headers)
               for method, path in await endpoints(api) if path != "/api/openapi.json"
               for kind, headers in refused.items()}
    assert {key: code for key, code in answers.items() if code != 401} == {}
    assert await snapshot(api) == before


@pytest.mark.parametrize("who", [RITA, CORA])
async def test_each_role_is_refused_where_it_lacks_the_right_and_the_refusal_audited(
        api: Api, who: str) -> None:
    access = Access(api.store.db)
    for (method, path), allowed in RESTRICTED.items():
        if who in allowed:
            continue
        denials = len([e for e in await access.audit(500) if e.action == "denied"])
        assert await call(api, method, path, api.auth(who)) == 403, (method, path)
        entries = [e for e in await access.audit(500) if e.action == "denied"]
        assert len(entries) == denials + 1 and entries[0].actor == who, (method, path)
    # Nothing refused was done.
    assert (await api.store.candidate("C-1")).name == "Ada Applicant"
    assert SAM in {m.email for m in await api.store.team()}
