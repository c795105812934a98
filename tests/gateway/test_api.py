"""The HTTP API against the real gateway: tokens, roles, sync, mail, visibility, audit."""

from __future__ import annotations

import email
import io
import mailbox
import zipfile
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from atsmail.storage.access import Access
from atsmail.storage.mailboxes import Account, Mailboxes
from tests.conftest import make_mail
from tests.gateway.conftest import ADMIN, CORA, RITA, SAM, Api


async def test_every_endpoint_needs_a_live_token(api: Api) -> None:
    assert (await api.client.get("/api/candidates")).status_code == 401
    wrong = await api.client.get("/api/candidates", headers={"Authorization": "Bearer atsm_x"})
    assert wrong.status_code == 401 and wrong.json() == {
        "error": "a valid bearer token is needed (atsmail token create)"}
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert (await api.client.get("/api/candidates", headers={
        "Authorization": "Basic YTpi"})).status_code == 401
    token_id = next(t.id for t in await Access(api.store.db).tokens() if t.member == SAM)
    assert (await api.get("/api/candidates", SAM)).status_code == 200
    await Access(api.store.db).revoke_token(token_id, "test")
    assert (await api.get("/api/candidates", SAM)).status_code == 401


async def test_roles_are_enforced_and_refusals_audited(api: Api) -> None:
    refused = await api.put("/api/internal-domains/corp.test", {}, RITA)
    assert refused.status_code == 403
    assert "needs the role admin" in refused.json()["error"]
    assert (RITA, "denied", "domain:corp.test") in await api.audit()
    assert (await api.put("/api/users/new@example.com", {"role": "admin"}, RITA)
            ).status_code == 403
    assert (await api.get("/api/audit", RITA)).status_code == 403
    assert (await api.put("/api/jobs/J9", {"title": "x"}, CORA)).status_code == 403
    assert (await api.get("/api/audit", CORA)).status_code == 200
    # The admin may.
    made = await api.put("/api/internal-domains/Corp.Test", {})
    assert (made.status_code, made.json()["domain"]) == (201, "corp.test")
    assert (await api.put("/api/internal-domains/corp.test", {})).status_code == 200
    assert [d["domain"] for d in (await api.get("/api/internal-domains", SAM)).json()] == [
        "corp.test", "example.com"]
    assert (await api.delete("/api/internal-domains/corp.test")).status_code == 204
    assert (await api.delete("/api/internal-domains/corp.test")).status_code == 404
    assert (ADMIN, "domain.add", "domain:corp.test") in await api.audit()


async def test_the_last_admin_stays_an_admin(api: Api) -> None:
    for refused in (await api.put(f"/api/users/{ADMIN}", {"role": "recruiter"}),
                    await api.delete(f"/api/users/{ADMIN}")):
        assert refused.status_code == 409
        assert refused.json()["error"] == (
            f"{ADMIN} is the last admin: make another member admin first")
    assert (await api.put(f"/api/users/{SAM}", {"role": "admin"})).status_code == 200
    assert (await api.put(f"/api/users/{ADMIN}", {"role": "recruiter"})).status_code == 200
    assert (await api.get("/api/users", SAM)).status_code == 200


async def test_an_ats_mirrors_its_team_jobs_and_candidates(api: Api) -> None:
    put = await api.put("/api/users/new.member@example.com", {"name": "New", "role": "recruiter"})
    assert put.status_code == 201
    assert put.json()["email"] == "new.member@example.com"
    assert (await api.put("/api/users/new.member@example.com",
                          {"name": "Renamed", "role": "compliance"})).json()["role"] == "compliance"
    assert (await api.put("/api/jobs/J7", {"title": "Chef"}, RITA)).status_code == 201
    again = await api.put("/api/jobs/J7", {"title": "Head Chef", "archived": True}, RITA)
    assert (again.status_code, again.json()["title"], again.json()["archived"]) == (
        200, "Head Chef", True)
    made = await api.put("/api/candidates/C-9", {
        "name": "Nia", "emails": ["nia@home.test", "nia@example.com"], "jobs": ["J7"]}, RITA)
    assert made.status_code == 201
    body = made.json()
    # The internal address is refused, with a notice saying why.
    assert body["emails"] == ["nia@home.test"]
    assert "nia@example.com was not added" in body["notices"][0]["text"]
    assert body["jobs"] == [{"id": "J7", "archived": True}]
    since = body["updated_at"]
    replaced = await api.put("/api/candidates/C-9", {"name": "Nia N", "emails": ["nia@new.test"]},
                             RITA)
    assert (replaced.status_code, replaced.json()["emails"], replaced.json()["jobs"]) == (
        200, ["nia@new.test"], [])
    changed = await api.get("/api/candidates", params={"updated_since": since})
    assert [c["id"] for c in changed.json()] == ["C-9"]
    assert [c["id"] for c in (await api.get("/api/candidates", params={"q": "NIA"})).json()] == [
        "C-9"]
    got = await api.get("/api/candidates/C-9")
    assert got.json()["name"] == "Nia N" and got.headers["etag"]
    unchanged = await api.get("/api/candidates/C-9", headers={"If-None-Match": got.headers["etag"]})
    assert unchanged.status_code == 304
    assert (await api.delete("/api/jobs/J7", RITA)).status_code == 204
    assert (await api.get("/api/jobs/J7")).status_code == 404


async def test_lists_come_in_pages(api: Api) -> None:
    for i in range(5):
        await api.put(f"/api/candidates/P-{i}", {"name": f"P{i}", "emails": [f"p{i}@x.test"]})
    first = await api.get("/api/candidates", params={"limit": 2, "q": "P-"})
    assert [c["id"] for c in first.json()] == ["P-0", "P-1"]
    assert 'rel="next"' in first.headers["link"]
    next_url = first.headers["link"].split(">")[0].lstrip("<")
    second = await api.client.get(next_url, headers=api.auth(ADMIN))
    assert [c["id"] for c in second.json()] == ["P-2", "P-3"]
    last = await api.get("/api/candidates", params={"limit": 2, "offset": 4, "q": "P-"})
    assert [c["id"] for c in last.json()] == ["P-4"] and "link" not in last.headers


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/api/candidates/C-5", {"name": "X", "emails": "x@y.test"}, 422, "emails"),
    ("/api/candidates/C-5", {"name": "X", "emails": ["x@y.test"], "extra": 1}, 422, "extra"),
    ("/api/candidates/C-5", {"name": 5, "emails": ["x@y.test"]}, 422, "name"),
    ("/api/candidates/C-5", {"name": "X", "emails": ["not an address"]}, 400, "address"),
    ("/api/candidates/C-5", {"name": "X", "emails": ["x@y.test"], "jobs": ["J404"]}, 409,
     "unknown job J404"),
    ("/api/candidates/C-5", {"name": "X\u0000", "emails": ["x@y.test"]}, 422, "NUL"),
    ("/api/candidates/C%085", {"name": "X", "emails": ["x@y.test"]}, 422, "candidate_id"),
    ("/api/candidates/C-5", [1, 2], 422, "invalid request"),
    ("/api/jobs/J5", {"title": "T", "archived": "yes"}, 422, "archived"),
    ("/api/users/not-an-address", {"role": "admin"}, 400, "address"),
    ("/api/users/x@example.com", {"role": "owner"}, 422, "role"),
])
async def test_bad_input_is_a_clear_4xx(api: Api, path: str, body: Any, status: int,
                                        says: str) -> None:
    response = await api.put(path, body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]


async def test_bodies_that_are_not_json_or_too_big_are_refused(api: Api) -> None:
    garbled = await api.client.put("/api/jobs/J5", content=b"{not json",
                                   headers={**api.auth(ADMIN), "Content-Type": "application/json"})
    assert garbled.status_code == 422
    huge = await api.client.put("/api/jobs/J5", content=b"x" * (65 * 1024),
                                headers={**api.auth(ADMIN), "Content-Type": "application/json"})
    assert huge.status_code == 413 and "over 65536 bytes" in huge.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(70):
            yield b"x" * 1024

    streamed = await api.client.put("/api/jobs/J5", content=chunks(),
                                    headers={**api.auth(ADMIN), "Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert (await api.get("/api/jobs/J5")).status_code == 404
    assert (await api.get("/api/threads/0")).status_code == 422
    assert (await api.get("/api/candidates", params={"limit": 100000})).status_code == 422
    for stamp in ("0.5", "2026-11-28", "2026-11-28T09:00:00", "yesterday"):
        assert (await api.get("/api/candidates", params={"updated_since": stamp})
                ).status_code == 422, stamp
    assert (await api.get("/api/candidates", params={"updated_since": "2026-11-28T09:00:00Z"})
            ).status_code == 200
    for nul in ({"q": "a\x00b"}, {"updated_since": "2026-11-28T09:00:00Z\x00"}):
        assert (await api.get("/api/candidates", params=nul)).status_code == 422, nul
    wrong_method = await api.client.patch("/api/jobs/J1", headers=api.auth(ADMIN))
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "DELETE, GET, PUT"


def with_attachment(sender: str, to: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Message-ID"] = email.utils.make_msgid(domain="applicant.test")
    msg.set_content("Please find my CV attached.\n")
    msg.add_alternative("<p>Please find my <b>CV</b> attached.<script>alert(1)</script></p>",
                        subtype="html")
    msg.add_attachment(b"%PDF-1.4 cv", maintype="application", subtype="pdf",
                       filename="cv.pdf")
    return msg.as_bytes()


async def test_captured_mail_is_read_exported_and_erased_with_an_audit_trail(
        api: Api, tmp_path: Path) -> None:
    await api.relay(with_attachment("ada@applicant.test", RITA, "My CV"), "ada@applicant.test",
                    [RITA])
    await api.relay(make_mail(RITA, "ada@applicant.test", "Re: My CV", "Thanks!\n"), RITA,
                    ["ada@applicant.test"])
    threads = (await api.get("/api/candidates/C-1/threads", RITA)).json()
    assert [(t["subject"], t["message_count"]) for t in threads] == [("My CV", 1),
                                                                      ("Re: My CV", 1)]
    thread = (await api.get(f"/api/threads/{threads[0]['id']}", RITA)).json()
    [message] = thread["messages"]
    assert (message["from"], message["access"]) == ("ada@applicant.test", "full")
    raw = await api.get(f"/api/messages/{message['id']}/raw", RITA)
    assert raw.headers["content-type"] == "message/rfc822"
    assert b"Please find my CV attached." in raw.content
    listed = (await api.get(f"/api/messages/{message['id']}/attachments", RITA)).json()
    assert listed == [{"index": 0, "filename": "cv.pdf", "content_type": "application/pdf",
                       "size": 11}]
    pdf = await api.get(f"/api/messages/{message['id']}/attachments/0", RITA)
    assert pdf.content == b"%PDF-1.4 cv"
    assert pdf.headers["content-disposition"] == 'attachment; filename="cv.pdf"'
    assert (await api.get(f"/api/messages/{message['id']}/attachments/1", RITA)
            ).status_code == 404

    # Export: compliance's job, in both formats.
    assert (await api.get("/api/candidates/C-1/export", RITA)).status_code == 403
    exported = await api.get("/api/candidates/C-1/export", CORA)
    path = tmp_path / "export.mbox"
    path.write_bytes(exported.content)
    box = mailbox.mbox(path)
    try:
        assert sorted(m["Subject"] for m in box) == ["My CV", "Re: My CV"]
    finally:
        box.close()
    zipped = await api.get("/api/candidates/C-1/export", CORA, params={"format": "zip"})
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
        assert len(archive.namelist()) == 2 and all(n.endswith(".eml") for n in
                                                    archive.namelist())

    erased = await api.delete("/api/candidates/C-1", CORA)
    assert erased.json() == {"erased_messages": 2, "scrubbed": erased.json()["scrubbed"]}
    assert (await api.get("/api/candidates/C-1")).status_code == 404
    assert (await api.get(f"/api/threads/{threads[0]['id']}")).status_code == 404
    trail = await api.audit()
    for entry in [(RITA, "view", "candidate:C-1:threads"), (RITA, "view",
                                                            f"thread:{threads[0]['id']}"),
                  (RITA, "view", f"message:{message['id']}"), (RITA, "denied", "candidate:C-1"),
                  (CORA, "export", "candidate:C-1"), (CORA, "erase", "candidate:C-1")]:
        assert entry in trail, entry
    log = (await api.get("/api/audit", CORA)).json()
    assert log[0]["action"] == "erase" and log[0]["actor"] == CORA


async def test_shared_and_personal_mailbox_limits_hold_on_the_api(api: Api) -> None:
    boxes = Mailboxes(api.store.db)
    await boxes.connect(Account(
        address="jobs@example.com", provider="imap", owner=None, shared=True,
        visible_to=[RITA], imap_host="127.0.0.1", imap_port=1, smtp_host="127.0.0.1",
        smtp_port=1, security="none", username="jobs@example.com", sealed_secret=b"x"))
    await boxes.connect(Account(
        address=SAM, provider="imap", owner=SAM, shared=False, visible_to=[],
        imap_host="127.0.0.1", imap_port=1, smtp_host="127.0.0.1", smtp_port=1,
        security="none", username=SAM, sealed_secret=b"x"))
    await boxes.set_sharing(SAM, "subject")
    await api.gateway.relay.refresh_directory()
    await api.relay(make_mail("ada@applicant.test", "jobs@example.com", "CV for jobs@"),
                    "ada@applicant.test", ["jobs@example.com"])
    await api.relay(make_mail(SAM, "ada@applicant.test", "Offer details"), SAM,
                    ["ada@applicant.test"])
    everything = (await api.get("/api/candidates/C-1/threads", CORA)).json()
    shared = next(t["id"] for t in everything if t["subject"] == "CV for jobs@")
    personal = next(t["id"] for t in everything if t["subject"] == "Offer details")
    # The shared mailbox's people see it; nobody else does, not even an admin.
    assert (await api.get(f"/api/threads/{shared}", RITA)).status_code == 200
    assert (await api.get(f"/api/threads/{shared}", ADMIN)).status_code == 404
    assert [t["subject"] for t in (await api.get("/api/candidates/C-1/threads", ADMIN)).json()
            ] == ["Offer details"]
    # Sam's mail is shared at `subject`: the subject, but no content.
    seen = (await api.get(f"/api/threads/{personal}", RITA)).json()
    [message] = seen["messages"]
    assert (message["subject"], message["access"]) == ("Offer details", "subject")
    refused = await api.get(f"/api/messages/{message['id']}/raw", RITA)
    assert refused.status_code == 403 and "subject only" in refused.json()["error"]
    assert (await api.get(f"/api/messages/{message['id']}/raw", SAM)).status_code == 200
    exported = await api.get("/api/candidates/C-1/export", CORA, params={"format": "zip"})
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        assert len(archive.namelist()) == 2


async def test_mail_sent_through_the_api_goes_to_the_outbox_as_the_caller(api: Api) -> None:
    await Mailboxes(api.store.db).set_hosted_identity(RITA, "rita@hosted.example")
    sent = await api.post("/api/messages", {"to": ["ada@applicant.test"], "subject": "Hello",
                                            "body": "Dear Ada,\n", "candidate": "C-1"}, RITA)
    assert sent.status_code == 202, sent.text
    assert set(sent.json()) == {"id", "message_id", "status"}
    assert sent.json()["status"] == "queued"
    mine = (await api.get("/api/outbox", RITA)).json()
    assert [m["id"] for m in mine] == [sent.json()["id"]]
    assert (await api.get("/api/outbox", SAM)).json() == []
    assert [m["id"] for m in (await api.get("/api/outbox", ADMIN)).json()] == [sent.json()["id"]]
    # JSON's 7.0 is the integer 7: an unknown thread (409), not a type error.
    assert (await api.post("/api/messages", {"to": ["ada@applicant.test"], "subject": "x",
                                             "body": "y", "thread": 7.0}, RITA)).status_code == 409
    nowhere = await api.post("/api/messages", {"to": ["ada@applicant.test"], "subject": "x",
                                               "body": "y"}, SAM)
    assert nowhere.status_code == 409 and "no hosted identity" in nowhere.json()["error"]
    assert (await api.post("/api/messages", {"to": [], "subject": "x", "body": "y"}, RITA)
            ).status_code == 422
    assert (await api.post("/api/messages", {"to": ["a@b.test"], "subject": "x", "body": "y"},
                           CORA)).status_code == 403


async def test_the_openapi_document_describes_the_api(api: Api) -> None:
    document = (await api.client.get("/api/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    for path in ("/api/users/{email}", "/api/jobs/{job_id}", "/api/candidates/{candidate_id}",
                 "/api/candidates/{candidate_id}/threads", "/api/threads/{thread_id}",
                 "/api/messages/{message_pk}/raw", "/api/internal-domains",
                 "/api/internal-domains/{domain}", "/api/mailboxes", "/api/messages",
                 "/api/audit"):
        assert path in document["paths"], path
    assert (await api.get("/api/mailboxes", SAM)).status_code == 200
