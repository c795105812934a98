"""The review pages over HTTP against the real gateway: login, pages, visibility, exports, erase.

The browser's view of the same pages is in test_review_browser.py.
"""

from __future__ import annotations

import io
import mailbox
import re
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from atsmail.gateway.review import COOKIE
from atsmail.storage.mailboxes import Account, Mailboxes
from tests.conftest import make_mail
from tests.gateway.conftest import ADMIN, CORA, RITA, SAM, Api

Login = Callable[[str], Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def login(api: Api) -> AsyncIterator[Login]:
    """A browser-like client per team member, signed in through the login form."""
    clients: list[httpx.AsyncClient] = []

    async def signed_in(who: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=str(api.client.base_url), timeout=10)
        clients.append(client)
        answer = await client.post("/review/login", data={"token": api.tokens[who]})
        assert answer.status_code == 303, answer.text
        return client

    yield signed_in
    for client in clients:
        await client.aclose()


def csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found, "no form on the page"
    return found[1]


def html_mail(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ada@applicant.test", RITA, subject
    msg["Message-ID"] = "<html-1@applicant.test>"
    msg.set_content("Plain words.\n")
    msg.add_alternative('<p onclick="steal()">Hello <b>Rita</b><script>steal()</script>'
                        '<img src="https://tracker.test/pixel.gif"></p>', subtype="html")
    msg.add_attachment(b"%PDF-1.4 cv", maintype="application", subtype="pdf",
                       filename="cv.pdf")
    return msg.as_bytes()


async def test_pages_need_a_login_which_takes_a_token_and_gives_a_strict_cookie(
        api: Api) -> None:
    client = api.client
    away = await client.get("/review/candidates/C-1")
    assert away.status_code == 303
    assert away.headers["location"] == "/review/login?next=/candidates/C-1"
    form = await client.get("/review/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    assert "default-src 'none'" in form.headers["content-security-policy"]
    assert form.headers["x-frame-options"] == "DENY"
    assert form.headers["referrer-policy"] == "no-referrer"

    wrong = await client.post("/review/login", data={"token": "atsm_wrong"})
    assert wrong.status_code == 401 and "not valid" in wrong.text

    answer = await client.post("/review/login", data={"token": api.tokens[RITA],
                                                      "next": "/candidates/C-1"})
    assert answer.status_code == 303 and answer.headers["location"] == "/review/candidates/C-1"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie and "Path=/review" in cookie
    # Only paths of these pages are followed after login: no open redirect.
    elsewhere = await client.post("/review/login", data={"token": api.tokens[RITA],
                                                         "next": "//evil.test/x"})
    assert elsewhere.headers["location"] == "/review/candidates"

    # The client kept the cookie.
    page = await client.get("/review/candidates/C-1")
    assert page.status_code == 200 and "Ada Applicant" in page.text
    # A script may use the bearer header instead of the cookie.
    assert (await api.get("/review/candidates", RITA)).status_code == 200
    assert (RITA, "login", "review") in await api.audit()


async def test_search_candidate_thread_and_message_pages_show_mail_safely(
        api: Api, login: Login) -> None:
    await api.relay(html_mail("Application with CV"), "ada@applicant.test", [RITA])
    client = await login(RITA)
    found = await client.get("/review/candidates", params={"q": "ada"})
    assert "Ada Applicant" in found.text and "Grace Hopper" not in found.text
    candidate = await client.get("/review/candidates/C-1")
    thread_url = re.search(r'href="(/review/threads/\d+)"', candidate.text)
    assert thread_url and "Application with CV" in candidate.text
    thread = await client.get(thread_url[1])
    message_url = re.search(r'href="(/review/messages/\d+)"', thread.text)
    assert message_url
    message = await client.get(message_url[1])
    assert "Plain words." in message.text and "cv.pdf" in message.text
    assert '<iframe class="mail-html" sandbox ' in message.text

    html = await client.get(f"{message_url[1]}/html")
    assert html.headers["content-security-policy"].startswith("default-src 'none'")
    assert "<b>Rita</b>" in html.text
    for unsafe in ("<script", "onclick", "<img", "tracker.test"):
        assert unsafe not in html.text
    attachment = await client.get(f"{message_url[1]}/attachments/0")
    assert attachment.content == b"%PDF-1.4 cv"
    assert attachment.headers["content-type"] == "application/octet-stream"
    assert attachment.headers["content-disposition"] == 'attachment; filename="cv.pdf"'
    audit = await api.audit()
    pk = message_url[1].rsplit("/", 1)[1]
    for target in ("candidate:C-1", f"thread:{thread_url[1].rsplit('/', 1)[1]}",
                   f"message:{pk}"):
        assert (RITA, "view", target) in audit


async def test_exports_are_for_compliance_and_admins_and_audited(
        api: Api, login: Login, tmp_path: Path) -> None:
    await api.relay(make_mail(RITA, "ada@applicant.test", "First"), RITA, ["ada@applicant.test"])
    await api.relay(make_mail("ada@applicant.test", RITA, "From Ada", "From the start\n"),
                    "ada@applicant.test", [RITA])
    cora = await login(CORA)
    page = await cora.get("/review/candidates/C-1")
    assert "Export mbox" in page.text
    exported = await cora.get("/review/candidates/C-1/export", params={"format": "mbox"})
    assert exported.headers["content-disposition"] == 'attachment; filename="candidate-C-1.mbox"'
    spool = tmp_path / "export.mbox"
    spool.write_bytes(exported.content)
    box = mailbox.mbox(spool)
    try:
        assert sorted(m["Subject"] for m in box) == ["First", "From Ada"]
        # A body line starting "From " is quoted, so it starts no message.
        assert len(box) == 2
    finally:
        box.close()
    zipped = await cora.get("/review/candidates/C-1/export", params={"format": "zip"})
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
        assert len(archive.namelist()) == 2
    assert (CORA, "export", "candidate:C-1") in await api.audit()

    rita = await login(RITA)
    assert "Export mbox" not in (await rita.get("/review/candidates/C-1")).text
    refused = await rita.get("/review/candidates/C-1/export")
    assert refused.status_code == 403 and "needs the role" in refused.text
    assert (RITA, "denied", "candidate:C-1") in await api.audit()
    assert (await rita.get("/review/audit")).status_code == 403
    audit_page = await cora.get("/review/audit")
    assert audit_page.status_code == 200 and "export" in audit_page.text


async def test_erasing_needs_the_form_of_this_session_and_the_id_typed(
        api: Api, login: Login) -> None:
    await api.relay(make_mail(RITA, "ada@applicant.test", "To be erased"), RITA,
                    ["ada@applicant.test"])
    cora = await login(CORA)
    form = await cora.get("/review/candidates/C-1/erase")
    assert "(1 message)" in form.text
    token = csrf(form)
    # Without the session's form token (a forged cross-site post), or with
    # another session's, nothing happens.
    for forged in ("", "0" * 64, csrf(await (await login(ADMIN)).get(
            "/review/candidates/C-1/erase"))):
        refused = await cora.post("/review/candidates/C-1/erase",
                                  data={"csrf": forged, "confirm": "C-1"})
        assert refused.status_code in (403, 422)
    mistyped = await cora.post("/review/candidates/C-1/erase",
                               data={"csrf": token, "confirm": "C-2"})
    assert mistyped.status_code == 400 and "exactly" in mistyped.text
    assert (await api.store.candidate("C-1")).name == "Ada Applicant"

    erased = await cora.post("/review/candidates/C-1/erase", data={"csrf": token,
                                                                   "confirm": "C-1"})
    assert erased.status_code == 303
    assert erased.headers["location"] == "/review/candidates?erased=C-1"
    assert (await cora.get("/review/candidates/C-1")).status_code == 404
    assert (CORA, "erase", "candidate:C-1") in await api.audit()
    assert "C-1 and their mail were erased" in (await cora.get(erased.headers["location"])).text

    out = await cora.post("/review/logout", data={"csrf": token})
    assert out.status_code == 303
    assert (await cora.get("/review/candidates")).status_code == 303


async def test_mailbox_limits_hold_on_the_pages_and_the_export(
        api: Api, login: Login) -> None:
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
    await api.relay(make_mail("ada@applicant.test", "jobs@example.com", "CV for jobs@",
                              "Secret CV text\n"), "ada@applicant.test", ["jobs@example.com"])
    await api.relay(make_mail(SAM, "ada@applicant.test", "Offer details", "Salary 99k\n"),
                    SAM, ["ada@applicant.test"])
    admin, rita = await login(ADMIN), await login(RITA)

    # The shared mailbox's mail: for Rita, who is listed; not for the admin.
    assert "CV for jobs@" in (await rita.get("/review/candidates/C-1")).text
    admin_page = (await admin.get("/review/candidates/C-1")).text
    assert "CV for jobs@" not in admin_page and "Offer details" in admin_page
    shared = next(t for t in await api.store.threads("C-1") if t.subject == "CV for jobs@")
    assert (await admin.get(f"/review/threads/{shared.id}")).status_code == 404
    # Sam's mail at `subject`: Rita sees the subject, never the body.
    personal = next(t for t in await api.store.threads("C-1") if t.subject == "Offer details")
    [message] = (await api.store.thread(personal.id)).messages
    page = await rita.get(f"/review/messages/{message['id']}")
    assert page.status_code == 200 and "Offer details" in page.text
    assert "Salary 99k" not in page.text and "shares its mail with you as" in page.text
    for part in ("raw", "html", "attachments/0"):
        refused = await rita.get(f"/review/messages/{message['id']}/{part}")
        assert refused.status_code == 403 and "Salary" not in refused.text
    # An export holds only what its reader may read in full: for the admin,
    # neither the shared mailbox's CV nor Sam's offer (shared at `subject`).
    exported = await admin.get("/review/candidates/C-1/export", params={"format": "zip"})
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        bodies = b"".join(archive.read(name) for name in archive.namelist())
    assert b"Secret CV text" not in bodies and b"Salary 99k" not in bodies
