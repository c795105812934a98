"""The compliance review pages under /review: find, read, export and erase a candidate's mail.

Server-rendered HTML (Jinja2, no scripts at all), behind the API's tokens:
a token pasted into the login form becomes an HttpOnly, SameSite=Strict
session cookie; a script may send it as a bearer header instead. Every page
obeys the same visibility as the API (a shared mailbox's mail for its
listed users only, personal mailboxes at their sharing level), and every
view, export and erase lands in the audit log.

Message HTML is sanitised (`content.safe_html`) and shown only inside a
sandboxed frame of its own, under a Content-Security-Policy that loads
nothing: no scripts, no remote images, no styles from the mail.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from importlib import resources
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.exceptions import HTTPException

from atsmail.gateway import content
from atsmail.storage import Store
from atsmail.storage.access import ROLES_THAT_AUDIT, ROLES_THAT_ERASE, Access
from atsmail.storage.store import NotFound, UserError
from atsmail.storage.visibility import Viewer

COOKIE = "atsmail_review"
SESSION_SECONDS = 8 * 3600
PAGE = 50

# Pages load their one stylesheet and nothing else; forms post only here.
PAGE_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
               "frame-src 'self'; frame-ancestors 'none'; base-uri 'none'")
# A message's HTML, in its sandboxed frame: nothing at all is loaded.
MAIL_POLICY = "default-src 'none'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"

_templates = Environment(loader=PackageLoader("atsmail.gateway", "templates"),
                         autoescape=select_autoescape(default=True), trim_blocks=True,
                         lstrip_blocks=True)


class LoginNeeded(Exception):
    pass


class Forbidden(Exception):
    pass


def _headers(policy: str = PAGE_POLICY, frame: str = "DENY") -> dict[str, str]:
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": frame,
            "Cache-Control": "no-store"}


def csrf_token(token: str) -> str:
    """The value forms carry to prove they came from a page of this session."""
    return hmac.new(token.encode(), b"atsmail review form", hashlib.sha256).hexdigest()


def create_review_app(store: Store) -> FastAPI:
    access = Access(store.db)
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def page(request: Request, template: str, status: int = 200, **values: Any) -> Response:
        viewer: Viewer | None = getattr(request.state, "viewer", None)
        token: str = getattr(request.state, "token", "")
        html = _templates.get_template(template).render(
            viewer=viewer, csrf=csrf_token(token) if token else "",
            auditor=viewer is not None and viewer.role in ROLES_THAT_AUDIT,
            eraser=viewer is not None and viewer.role in ROLES_THAT_ERASE,
            root=request.scope.get("root_path", ""), **values)
        return HTMLResponse(html, status_code=status, headers=_headers())

    async def signed_in(request: Request) -> Viewer:
        """The member behind the session cookie or bearer header; else to the login page."""
        header = request.headers.get("authorization", "")
        token = (header[7:].strip() if header[:7].lower() == "bearer "
                 else request.cookies.get(COOKIE, ""))
        viewer = await access.authenticate(token) if token else None
        if viewer is None:
            raise LoginNeeded()
        request.state.viewer, request.state.token = viewer, token
        return viewer

    async def allowed(viewer: Viewer, roles: Sequence[str], action: str, target: str) -> None:
        if viewer.role not in roles:
            await access.record(viewer.email, "denied", target, attempted=action,
                                role=viewer.role, via="review")
            raise Forbidden(f"{action} needs the role {' or '.join(roles)}")

    def checked_form(request: Request, csrf: str) -> None:
        if not hmac.compare_digest(csrf, csrf_token(request.state.token)):
            raise Forbidden("this form has expired or did not come from these pages: "
                            "reload the page and try again")

    @app.exception_handler(LoginNeeded)
    async def login_needed(request: Request, exc: LoginNeeded) -> Response:
        root = request.scope.get("root_path", "")
        wanted = request.url.path.removeprefix(root) + (
            f"?{request.url.query}" if request.url.query else "")
        response = RedirectResponse(f"{root}/login?next={quote(wanted)}", status_code=303,
                                    headers=_headers())
        response.delete_cookie(COOKIE, path=root or "/")
        return response

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        return page(request, "error.html", 403, title="Not allowed", message=str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> Response:
        return page(request, "error.html", 404, title="Not found", message=str(exc))

    @app.exception_handler(UserError)
    async def refused(request: Request, exc: UserError) -> Response:
        return page(request, "error.html", 409, title="Refused", message=str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return page(request, "error.html", exc.status_code, title="Not here",
                    message=str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return page(request, "error.html", 422, title="Not understood",
                    message="the address or form had a value these pages cannot use")

    # --- signing in and out ------------------------------------------------------

    @app.get("/login")
    async def login_form(request: Request, next: str = "") -> Response:
        return page(request, "login.html", next=_local(next))

    @app.post("/login")
    async def login(request: Request, token: Annotated[str, Form(max_length=200)],
                    next: Annotated[str, Form(max_length=2000)] = "") -> Response:
        viewer = await access.authenticate(token.strip())
        if viewer is None:
            return page(request, "login.html", 401, next=_local(next),
                        error="That token is not valid: it may be mistyped or revoked.")
        await access.record(viewer.email, "login", "review")
        root = request.scope.get("root_path", "")
        response = RedirectResponse(f"{root}{_local(next) or '/candidates'}",
                                    status_code=303, headers=_headers())
        response.set_cookie(COOKIE, token.strip(), max_age=SESSION_SECONDS, path=root or "/",
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/logout")
    async def logout(request: Request, csrf: Annotated[str, Form(max_length=100)]) -> Response:
        viewer = await signed_in(request)
        checked_form(request, csrf)
        await access.record(viewer.email, "logout", "review")
        root = request.scope.get("root_path", "")
        response = RedirectResponse(f"{root}/login", status_code=303, headers=_headers())
        response.delete_cookie(COOKIE, path=root or "/")
        return response

    @app.get("/style.css")
    async def stylesheet() -> Response:
        css = resources.files("atsmail.gateway").joinpath("static/review.css").read_bytes()
        return Response(css, media_type="text/css", headers={
            "Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    # --- candidates ------------------------------------------------------------------

    @app.get("/")
    async def home(request: Request) -> Response:
        await signed_in(request)
        return RedirectResponse(f"{request.scope.get('root_path', '')}/candidates",
                                status_code=303, headers=_headers())

    @app.get("/candidates")
    async def candidates(request: Request, q: Annotated[str, Query(max_length=200)] = "",
                         offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
                         erased: Annotated[str, Query(max_length=100)] = "") -> Response:
        await signed_in(request)
        found = await store.candidates(q.strip(), None, PAGE + 1, offset)
        return page(request, "candidates.html", title="Candidates", q=q, offset=offset,
                    candidates=found[:PAGE], more=len(found) > PAGE, page_size=PAGE,
                    erased=erased)

    @app.get("/candidates/{candidate_id}")
    async def candidate(request: Request, candidate_id: str) -> Response:
        viewer = await signed_in(request)
        view = await store.candidate(candidate_id)
        threads = await store.threads(candidate_id, viewer)
        await access.record(viewer.email, "view", f"candidate:{candidate_id}", via="review")
        return page(request, "candidate.html", title=view.name or view.id, candidate=view,
                    threads=threads)

    @app.get("/candidates/{candidate_id}/export")
    async def export(request: Request, candidate_id: str,
                     format: Literal["mbox", "zip"] = "mbox") -> Response:
        viewer = await signed_in(request)
        await allowed(viewer, ROLES_THAT_AUDIT, "exporting mail", f"candidate:{candidate_id}")
        found = await store.candidate_messages(candidate_id, viewer)
        items = [content.Exported(m.raw, m.from_addr, m.date, f"{m.id:06d}") for m in found]
        await access.record(viewer.email, "export", f"candidate:{candidate_id}",
                            format=format, messages=len(items), via="review")
        data, kind, name = content.export(items, format, f"candidate-{candidate_id}")
        return Response(data, media_type=kind, headers={
            **_headers(), "Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/candidates/{candidate_id}/erase")
    async def erase_form(request: Request, candidate_id: str) -> Response:
        viewer = await signed_in(request)
        await allowed(viewer, ROLES_THAT_ERASE, "erasing candidates", f"candidate:{candidate_id}")
        view = await store.candidate(candidate_id)
        threads = await store.threads(candidate_id)
        return page(request, "erase.html", title=f"Erase {view.name or view.id}",
                    candidate=view, messages=sum(t.message_count for t in threads))

    @app.post("/candidates/{candidate_id}/erase")
    async def erase(request: Request, candidate_id: str,
                    csrf: Annotated[str, Form(max_length=100)],
                    confirm: Annotated[str, Form(max_length=200)] = "") -> Response:
        viewer = await signed_in(request)
        checked_form(request, csrf)
        await allowed(viewer, ROLES_THAT_ERASE, "erasing candidates", f"candidate:{candidate_id}")
        view = await store.candidate(candidate_id)
        if confirm.strip() != candidate_id:
            threads = await store.threads(candidate_id)
            return page(request, "erase.html", 400, title=f"Erase {view.name or view.id}",
                        candidate=view, messages=sum(t.message_count for t in threads),
                        error="Type the candidate's id exactly to confirm.")
        erased, _ = await store.delete_candidate(candidate_id)
        await access.record(viewer.email, "erase", f"candidate:{candidate_id}",
                            messages=erased, via="review")
        root = request.scope.get("root_path", "")
        return RedirectResponse(f"{root}/candidates?erased={quote(candidate_id)}",
                                status_code=303, headers=_headers())

    # --- threads and messages ---------------------------------------------------

    @app.get("/threads/{thread_id}")
    async def thread(request: Request, thread_id: int) -> Response:
        viewer = await signed_in(request)
        detail = await store.thread(thread_id, viewer)
        await access.record(viewer.email, "view", f"thread:{thread_id}", via="review")
        return page(request, "thread.html", title=detail.subject or "(subject not shared)",
                    thread=detail)

    @app.get("/messages/{message_pk}")
    async def message(request: Request, message_pk: int) -> Response:
        viewer = await signed_in(request)
        found, level = await store.message(message_pk, viewer)
        parsed = content.parse(found.raw) if level == "full" else None
        await access.record(viewer.email, "view", f"message:{message_pk}", via="review")
        return page(request, "message.html", title=found.subject if level != "metadata"
                    else "(subject not shared)", message=found, level=level,
                    text=content.text(parsed) if parsed else "",
                    has_html=parsed is not None and content.safe_html(parsed) is not None,
                    attachments=content.attachments(parsed) if parsed else [])

    async def readable(request: Request, message_pk: int) -> tuple[Viewer, Any]:
        viewer = await signed_in(request)
        found, level = await store.message(message_pk, viewer)
        if level != "full":
            raise Forbidden(f"message {message_pk} is shared with you as {level} only: "
                            "no content")
        return viewer, found

    @app.get("/messages/{message_pk}/html")
    async def message_html(request: Request, message_pk: int) -> Response:
        viewer, found = await readable(request, message_pk)
        html = content.safe_html(content.parse(found.raw)) or ""
        await access.record(viewer.email, "view", f"message:{message_pk}", part="html",
                            via="review")
        document = ('<!doctype html><html><head><meta charset="utf-8"></head><body>'
                    f"{html}</body></html>")
        return HTMLResponse(document, headers=_headers(MAIL_POLICY, "SAMEORIGIN"))

    @app.get("/messages/{message_pk}/raw")
    async def message_raw(request: Request, message_pk: int) -> Response:
        viewer, found = await readable(request, message_pk)
        await access.record(viewer.email, "view", f"message:{message_pk}", part="raw",
                            via="review")
        return Response(found.raw, media_type="message/rfc822", headers={
            **_headers(), "Content-Disposition":
            f'attachment; filename="message-{message_pk}.eml"'})

    @app.get("/messages/{message_pk}/attachments/{index}")
    async def attachment(request: Request, message_pk: int, index: int) -> Response:
        viewer, found = await readable(request, message_pk)
        items = content.attachments(content.parse(found.raw))
        if not 0 <= index < len(items):
            raise NotFound(f"message {message_pk} has no attachment {index}")
        await access.record(viewer.email, "view", f"message:{message_pk}",
                            part=f"attachment {index}", via="review")
        return Response(items[index].data, media_type="application/octet-stream", headers={
            **_headers(), "Content-Disposition":
            f'attachment; filename="{content.safe_filename(items[index].filename)}"'})

    # --- the audit log -------------------------------------------------------------

    @app.get("/audit")
    async def audit(request: Request,
                    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> Response:
        viewer = await signed_in(request)
        await allowed(viewer, ROLES_THAT_AUDIT, "reading the audit log", "audit")
        entries = await access.audit(PAGE + 1, offset)
        return page(request, "audit.html", title="Audit log", entries=entries[:PAGE],
                    more=len(entries) > PAGE, offset=offset, page_size=PAGE)

    return app


def _local(target: str) -> str:
    """`target` if it is a path of these pages, else nothing: no open redirect."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return ""
