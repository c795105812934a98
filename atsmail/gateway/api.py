"""The HTTP API: the ATS feeds atsmail and reads captured mail through it.

JSON over HTTP with bearer tokens (`atsmail token create`), described by the
OpenAPI document at /api/openapi.json. Objects have the same fields as the
CLI's `--json` output. The handlers stay thin: they check the caller's role,
call the store, and map its refusals to 4xx with a JSON `{"error": ...}`;
bad input is a 4xx, never a 500. Every view, export, erase and change of
configuration is written to the audit log; what a caller may see of
captured mail is decided by `storage.visibility`, as on every other path.
"""

import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from pydantic.config import JsonDict
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atsmail.config import Config
from atsmail.gateway import content
from atsmail.gateway.review import create_review_app
from atsmail.gateway.sender import queue_message
from atsmail.storage import BadInput, NotFound, Refused, Store, UserError
from atsmail.storage.access import (
    ROLES_THAT_AUDIT,
    ROLES_THAT_EDIT,
    ROLES_THAT_ERASE,
    Access,
    audit_json,
)
from atsmail.storage.mailboxes import Mailboxes, mailbox_json
from atsmail.storage.outbox import Outbox, outbox_json
from atsmail.storage.store import checked_domain, job_json, member_json
from atsmail.storage.visibility import Viewer

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_PAGE = 500
# Row ids are 32-bit in every store, and below 2**53 a JSON number is exact.
MAX_ID = 2**31 - 1


# --- what goes in and out ------------------------------------------------------


class _In(BaseModel):
    # Wrong types and unknown fields are refused, never guessed at.
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        """No NUL characters or lone surrogates: no database can store them as text."""
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not _storable_text(text):
                raise ValueError("contains a NUL character or an unpaired surrogate")
        return value


def _storable_text(text: str) -> bool:
    return "\x00" not in text and not any("\ud800" <= c <= "\udfff" for c in text)


# How the OpenAPI document describes text, ids and addresses, so generated
# clients (and API fuzzers) know what the store takes. What `checked_id`
# accepts: no spaces, no control characters. (Lone surrogates, which the
# validator above also refuses, cannot be put in a JSON Schema pattern.)
ID_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f]{1,100}$"
TEXT: JsonDict = {"pattern": r"^[^\x00]*$"}
_LABEL = r"[^\s@.\x00-\x1f\x7f-\x9f]+"
DOMAIN_PATTERN = rf"^@?({_LABEL}\.)+{_LABEL}\.?$"
EMAIL: JsonDict = {"format": "email"}


class UserIn(_In):
    name: str = Field("", max_length=200, json_schema_extra=TEXT)
    role: Literal["admin", "recruiter", "compliance"] = "recruiter"


class JobIn(_In):
    title: str = Field(min_length=1, max_length=300, json_schema_extra=TEXT)
    archived: bool = False


class CandidateIn(_In):
    name: str = Field(min_length=1, max_length=300, json_schema_extra=TEXT)
    emails: list[Annotated[str, Field(min_length=3, max_length=320, json_schema_extra=EMAIL)]
                 ] = Field(min_length=1, max_length=100)
    jobs: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(
        default_factory=list, max_length=100)


class MessageIn(_In):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    to: list[Annotated[str, Field(min_length=3, max_length=320, json_schema_extra=EMAIL)]
             ] = Field(min_length=1, max_length=100)
    subject: str = Field(max_length=998, json_schema_extra=TEXT)
    body: str = Field(max_length=5_000_000, json_schema_extra=TEXT)
    candidate: str | None = Field(None, pattern=ID_PATTERN)
    thread: int | None = Field(None, ge=1, le=MAX_ID)
    from_: str | None = Field(None, alias="from", min_length=3, max_length=320,
                              json_schema_extra=EMAIL)

    @field_validator("thread", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        # JSON has one number type: 7.0 is the integer 7 to a JSON Schema.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class ErrorOut(BaseModel):
    error: str


class UserOut(BaseModel):
    email: str
    name: str
    role: str
    hosted_address: str | None
    created_at: datetime
    updated_at: datetime


class JobOut(BaseModel):
    id: str
    title: str
    archived: bool
    candidates: int
    updated_at: datetime


class JobRef(BaseModel):
    id: str
    archived: bool


class NoticeOut(BaseModel):
    text: str
    at: datetime


class CandidateOut(BaseModel):
    id: str
    name: str
    emails: list[str]
    jobs: list[JobRef]
    notices: list[NoticeOut]
    updated_at: datetime


class ThreadSummaryOut(BaseModel):
    id: int
    subject: str
    candidates: list[str]
    message_count: int
    last_date: datetime


class MessageOut(BaseModel):
    id: int
    message_id: str | None
    direction: str
    source: str
    sources: list[str]
    # "from" is a Python keyword: the field is named for JSON by its alias.
    from_: str = Field(alias="from")
    to: list[str]
    cc: list[str]
    subject: str
    date: datetime | None
    size: int
    access: Literal["full", "subject", "metadata"]


class ThreadOut(BaseModel):
    id: int
    subject: str
    candidates: list[str]
    messages: list[MessageOut]


class AttachmentOut(BaseModel):
    index: int
    filename: str
    content_type: str
    size: int


class DomainOut(BaseModel):
    domain: str
    created_at: datetime


class MailboxOut(BaseModel):
    address: str
    provider: str
    owner: str | None
    shared: bool
    visible_to: list[str]
    state: str
    last_sync: datetime | None
    last_error: str | None
    sharing: str | None
    # The gateway whose mirror holds the mailbox's lease, if one does.
    mirrored_by: str | None


class OutboxOut(BaseModel):
    id: int
    message_id: str
    status: str
    attempts: int
    last_error: str | None


class SentOut(BaseModel):
    id: int
    message_id: str
    status: str


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class ErasedOut(BaseModel):
    erased_messages: int
    scrubbed: bool


# --- plumbing ------------------------------------------------------------------


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, announced or not."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _error(413, f"the request body is over {self.limit} bytes")(scope, receive,
                                                                               send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": text}, status_code=status, headers=headers)


def _json(request: Request, adapter: TypeAdapter[Any], data: Any, status: int = 200,
          headers: dict[str, str] | None = None) -> Response:
    """JSON as the OpenAPI document says, with an ETag; 304 when the client has it."""
    body = adapter.dump_json(adapter.validate_python(data), by_alias=True)
    tag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    all_headers = {"ETag": tag, "Cache-Control": "private, no-cache", **(headers or {})}
    if request.method == "GET" and tag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=all_headers)
    return Response(body, status_code=status, media_type="application/json",
                    headers=all_headers)


def _page(request: Request, adapter: TypeAdapter[Any], items: Sequence[Any], limit: int,
          offset: int, more: bool) -> Response:
    """A page of a list, with a Link to the next page when there is one (RFC 8288)."""
    headers = {}
    if more:
        url = request.url.include_query_params(limit=limit, offset=offset + limit)
        headers["Link"] = f'<{url}>; rel="next"'
    return _json(request, adapter, list(items), headers=headers)


Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Items per page.")]
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="Items to skip.")]
CandidateId = Annotated[str, Path(pattern=ID_PATTERN)]
Email = Annotated[str, Path(min_length=3, max_length=320, json_schema_extra=EMAIL)]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]


def _timestamp(name: str, value: str | None) -> datetime | None:
    """An RFC 3339 date-time with its offset; a bare date or number is refused."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or "T" not in value.upper():
        raise HTTPException(422, f"invalid request: {name}: expected an RFC 3339 date-time "
                                 "with its offset, such as 2026-11-28T09:00:00Z")
    return parsed


def _sliced(items: Sequence[T], limit: int, offset: int) -> tuple[list[T], bool]:
    return list(items[offset:offset + limit]), len(items) > offset + limit


# --- the application -------------------------------------------------------------


def create_app(config: Config, store: Store) -> FastAPI:
    access = Access(store.db)
    mailboxes = Mailboxes(store.db)
    bearer = HTTPBearer(auto_error=False, description="A token from `atsmail token create`.")
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422)}
    app = FastAPI(title="atsmail", version="1", openapi_url="/api/openapi.json",
                  docs_url="/api/docs", redoc_url=None, responses=errors)

    async def caller(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                            Depends(bearer)]) -> Viewer:
        viewer = await access.authenticate(credentials.credentials) if credentials else None
        if viewer is None:
            raise HTTPException(401, "a valid bearer token is needed (atsmail token create)",
                                headers={"WWW-Authenticate": "Bearer"})
        return viewer

    Caller = Annotated[Viewer, Depends(caller)]

    async def allowed(viewer: Viewer, roles: Sequence[str], action: str, target: str) -> None:
        if viewer.role not in roles:
            await access.record(viewer.email, "denied", target, attempted=action,
                                role=viewer.role)
            raise HTTPException(403, f"{action} needs the role {' or '.join(roles)}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Each method of a path is its own route: name them all.
            headers["Allow"] = ", ".join(sorted(_methods_at(app, request.scope)))
        return _error(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()[:10])
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(UserError)
    async def refused(request: Request, exc: UserError) -> Response:
        # Malformed values are 400; a well-formed request the current state
        # refuses (an unknown job named, no mailbox to send from) is 409.
        status = (400 if isinstance(exc, BadInput) else 404 if isinstance(exc, NotFound)
                  else 403 if isinstance(exc, Refused) else 409)
        return _error(status, str(exc))

    @app.exception_handler(Exception)
    async def broken(request: Request, exc: Exception) -> Response:
        log.exception("the API failed on %s %s", request.method, request.url.path)
        return _error(500, "internal error; the gateway's log has the details")

    # --- team members ----------------------------------------------------------

    users = TypeAdapter(list[UserOut])
    user = TypeAdapter(UserOut)

    # The review pages: HTML for people, with error pages of their own.
    app.mount("/review", create_review_app(store))

    @app.get("/api/users", response_model=list[UserOut], tags=["team"])
    async def list_users(request: Request, viewer: Caller, limit: Limit = 100,
                         offset: Offset = 0) -> Response:
        items, more = _sliced([member_json(m) for m in await store.team()], limit, offset)
        return _page(request, users, items, limit, offset, more)

    @app.get("/api/users/{email}", response_model=UserOut, tags=["team"])
    async def get_user(request: Request, email: Email, viewer: Caller) -> Response:
        return _json(request, user, member_json(await store.team_member(email)))

    @app.put("/api/users/{email}", response_model=UserOut, tags=["team"],
             responses={201: {"model": UserOut}})
    async def put_user(request: Request, email: Email, body: UserIn,
                       viewer: Caller) -> Response:
        await allowed(viewer, ("admin",), "changing team members", f"user:{email}")
        created, _ = await store.put_team_member(email, body.name, body.role)
        member = await store.team_member(email)
        await access.record(viewer.email, "user.put", f"user:{member.email}",
                            role=body.role, created=created)
        return _json(request, user, member_json(member), 201 if created else 200)

    @app.delete("/api/users/{email}", status_code=204, tags=["team"])
    async def delete_user(email: Email, viewer: Caller) -> Response:
        await allowed(viewer, ("admin",), "removing team members", f"user:{email}")
        await store.remove_team_member(email)
        await access.record(viewer.email, "user.delete", f"user:{email}")
        return Response(status_code=204)

    # --- jobs --------------------------------------------------------------------

    jobs = TypeAdapter(list[JobOut])
    job = TypeAdapter(JobOut)

    @app.get("/api/jobs", response_model=list[JobOut], tags=["jobs"])
    async def list_jobs(request: Request, viewer: Caller, limit: Limit = 100,
                        offset: Offset = 0) -> Response:
        items, more = _sliced([job_json(j, n) for j, n in await store.jobs()], limit, offset)
        return _page(request, jobs, items, limit, offset, more)

    @app.get("/api/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    async def get_job(request: Request, job_id: CandidateId, viewer: Caller) -> Response:
        return _json(request, job, job_json(*await store.job(job_id)))

    @app.put("/api/jobs/{job_id}", response_model=JobOut, tags=["jobs"],
             responses={201: {"model": JobOut}})
    async def put_job(request: Request, job_id: CandidateId, body: JobIn,
                      viewer: Caller) -> Response:
        await allowed(viewer, ROLES_THAT_EDIT, "changing jobs", f"job:{job_id}")
        created = await store.put_job(job_id, body.title, body.archived)
        return _json(request, job, job_json(*await store.job(job_id)), 201 if created else 200)

    @app.delete("/api/jobs/{job_id}", status_code=204, tags=["jobs"])
    async def delete_job(job_id: CandidateId, viewer: Caller) -> Response:
        await allowed(viewer, ROLES_THAT_EDIT, "removing jobs", f"job:{job_id}")
        await store.remove_job(job_id)
        return Response(status_code=204)

    # --- candidates --------------------------------------------------------------

    candidates = TypeAdapter(list[CandidateOut])
    candidate = TypeAdapter(CandidateOut)
    summaries = TypeAdapter(list[ThreadSummaryOut])

    @app.get("/api/candidates", response_model=list[CandidateOut], tags=["candidates"])
    async def list_candidates(
            request: Request, viewer: Caller, limit: Limit = 100, offset: Offset = 0,
            q: Annotated[str, Query(max_length=200, pattern=TEXT["pattern"],
                                    description="Part of an id, name or address.")] = "",
            updated_since: Annotated[str | None, Query(
                max_length=64, pattern=TEXT["pattern"], json_schema_extra={"format": "date-time"},
                description="Only candidates changed after this time (RFC 3339).")] = None,
    ) -> Response:
        found = await store.candidates(q, _timestamp("updated_since", updated_since),
                                       limit + 1, offset)
        return _page(request, candidates, [v.to_json() for v in found[:limit]], limit, offset,
                     len(found) > limit)

    @app.get("/api/candidates/{candidate_id}", response_model=CandidateOut,
             tags=["candidates"])
    async def get_candidate(request: Request, candidate_id: CandidateId,
                            viewer: Caller) -> Response:
        view = await store.candidate(candidate_id)
        await access.record(viewer.email, "view", f"candidate:{candidate_id}")
        return _json(request, candidate, view.to_json())

    @app.put("/api/candidates/{candidate_id}", response_model=CandidateOut,
             tags=["candidates"], responses={201: {"model": CandidateOut}})
    async def put_candidate(request: Request, candidate_id: CandidateId, body: CandidateIn,
                            viewer: Caller) -> Response:
        await allowed(viewer, ROLES_THAT_EDIT, "changing candidates",
                      f"candidate:{candidate_id}")
        created, _ = await store.put_candidate(candidate_id, body.name, body.emails, body.jobs)
        view = await store.candidate(candidate_id)
        return _json(request, candidate, view.to_json(), 201 if created else 200)

    @app.delete("/api/candidates/{candidate_id}", response_model=ErasedOut,
                tags=["candidates"])
    async def erase_candidate(request: Request, candidate_id: CandidateId,
                              viewer: Caller) -> Response:
        await allowed(viewer, ROLES_THAT_ERASE, "erasing candidates",
                      f"candidate:{candidate_id}")
        erased, scrubbed = await store.delete_candidate(candidate_id)
        await access.record(viewer.email, "erase", f"candidate:{candidate_id}",
                            messages=erased)
        return _json(request, TypeAdapter(ErasedOut),
                     ErasedOut(erased_messages=erased, scrubbed=scrubbed))

    @app.get("/api/candidates/{candidate_id}/threads", response_model=list[ThreadSummaryOut],
             tags=["mail"])
    async def candidate_threads(request: Request, candidate_id: CandidateId, viewer: Caller,
                                limit: Limit = 100, offset: Offset = 0) -> Response:
        found = await store.threads(candidate_id, viewer)
        await access.record(viewer.email, "view", f"candidate:{candidate_id}:threads")
        items, more = _sliced([t.to_json() for t in found], limit, offset)
        return _page(request, summaries, items, limit, offset, more)

    @app.get("/api/candidates/{candidate_id}/export", tags=["mail"],
             response_class=Response,
             responses={200: {"content": {"application/mbox": {}, "application/zip": {}},
                              "description": "The candidate's mail."}})
    async def export_candidate(
            candidate_id: CandidateId, viewer: Caller,
            format: Annotated[Literal["mbox", "zip"], Query()] = "mbox") -> Response:
        await allowed(viewer, ROLES_THAT_AUDIT, "exporting mail", f"candidate:{candidate_id}")
        found = await store.candidate_messages(candidate_id, viewer)
        items = [content.Exported(m.raw, m.from_addr, m.date, f"{m.id:06d}") for m in found]
        await access.record(viewer.email, "export", f"candidate:{candidate_id}",
                            format=format, messages=len(items))
        data, kind, name = content.export(items, format, f"candidate-{candidate_id}")
        return Response(data, media_type=kind, headers={
            "Content-Disposition": f'attachment; filename="{name}"'})

    # --- threads and messages ----------------------------------------------------

    thread = TypeAdapter(ThreadOut)

    @app.get("/api/threads/{thread_id}", response_model=ThreadOut, tags=["mail"])
    async def get_thread(request: Request, thread_id: Id, viewer: Caller) -> Response:
        detail = await store.thread(thread_id, viewer)
        await access.record(viewer.email, "view", f"thread:{thread_id}")
        return _json(request, thread, detail.to_json())

    async def full_message(pk: int, viewer: Viewer) -> tuple[Any, Any]:
        found, level = await store.message(pk, viewer)
        if level != "full":
            raise Refused(f"message {pk} is shared with you as {level} only: no content")
        return found, content.parse(found.raw)

    @app.get("/api/messages/{message_pk}/raw", tags=["mail"], response_class=Response,
             responses={200: {"content": {"message/rfc822": {}},
                              "description": "The message as captured."}})
    async def raw_message(message_pk: Id, viewer: Caller) -> Response:
        found, _ = await full_message(message_pk, viewer)
        await access.record(viewer.email, "view", f"message:{message_pk}", part="raw")
        return Response(found.raw, media_type="message/rfc822", headers={
            "Content-Disposition": f'attachment; filename="message-{message_pk}.eml"'})

    @app.get("/api/messages/{message_pk}/attachments", response_model=list[AttachmentOut],
             tags=["mail"])
    async def list_attachments(request: Request, message_pk: Id, viewer: Caller) -> Response:
        _, parsed = await full_message(message_pk, viewer)
        listed = [{"index": a.index, "filename": a.filename, "content_type": a.content_type,
                   "size": len(a.data)} for a in content.attachments(parsed)]
        await access.record(viewer.email, "view", f"message:{message_pk}",
                            part="attachments")
        return _json(request, TypeAdapter(list[AttachmentOut]), listed)

    @app.get("/api/messages/{message_pk}/attachments/{index}", tags=["mail"],
             response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}},
                              "description": "The attachment's bytes."}})
    async def get_attachment(message_pk: Id, index: Annotated[int, Path(ge=0, le=10_000)],
                             viewer: Caller) -> Response:
        _, parsed = await full_message(message_pk, viewer)
        found = content.attachments(parsed)
        if index >= len(found):
            raise NotFound(f"message {message_pk} has no attachment {index}")
        item = found[index]
        await access.record(viewer.email, "view", f"message:{message_pk}",
                            part=f"attachment {index}")
        # Always a download, never rendered in our origin.
        return Response(item.data, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{content.safe_filename(item.filename)}"',
            "X-Content-Type-Options": "nosniff"})

    @app.post("/api/messages", status_code=202, response_model=SentOut, tags=["mail"],
              responses={202: {"model": SentOut}})
    async def send_message(request: Request, body: MessageIn, viewer: Caller) -> Response:
        await allowed(viewer, ROLES_THAT_EDIT, "sending mail", "outbox")
        item = await queue_message(store.db, viewer.email, body.to, body.subject, body.body,
                                   body.candidate, body.thread, body.from_)
        return _json(request, TypeAdapter(SentOut), {
            "id": item.id, "message_id": item.message_id, "status": item.status}, 202)

    @app.get("/api/outbox", response_model=list[OutboxOut], tags=["mail"])
    async def list_outbox(request: Request, viewer: Caller, limit: Limit = 100,
                          offset: Offset = 0) -> Response:
        everything = viewer.role == "admin"
        items = [outbox_json(i) for i in await Outbox(store.db).all()
                 if everything or i.sender == viewer.email]
        page, more = _sliced(items, limit, offset)
        return _page(request, TypeAdapter(list[OutboxOut]), page, limit, offset, more)

    # --- internal domains and mailboxes ------------------------------------------

    domains = TypeAdapter(list[DomainOut])

    @app.get("/api/internal-domains", response_model=list[DomainOut], tags=["team"])
    async def list_domains(request: Request, viewer: Caller, limit: Limit = 100,
                           offset: Offset = 0) -> Response:
        items, more = _sliced([{"domain": d.domain, "created_at": d.created_at}
                               for d in await store.domains()], limit, offset)
        return _page(request, domains, items, limit, offset, more)

    Domain = Annotated[str, Path(max_length=255, pattern=DOMAIN_PATTERN)]

    @app.put("/api/internal-domains/{domain}", response_model=DomainOut, tags=["team"],
             responses={201: {"model": DomainOut}})
    async def put_domain(request: Request, domain: Domain, viewer: Caller) -> Response:
        await allowed(viewer, ("admin",), "changing internal domains", f"domain:{domain}")
        name = checked_domain(domain)
        created = name not in {d.domain for d in await store.domains()}
        if created:
            removed = await store.add_domain(name)
            await access.record(viewer.email, "domain.add", f"domain:{name}",
                                addresses_removed=len(removed))
        found = next(d for d in await store.domains() if d.domain == name)
        return _json(request, TypeAdapter(DomainOut),
                     {"domain": found.domain, "created_at": found.created_at},
                     201 if created else 200)

    @app.delete("/api/internal-domains/{domain}", status_code=204, tags=["team"])
    async def delete_domain(domain: Domain, viewer: Caller) -> Response:
        await allowed(viewer, ("admin",), "changing internal domains", f"domain:{domain}")
        try:
            await store.remove_domain(domain)
        except UserError as exc:
            raise NotFound(str(exc)) from None
        await access.record(viewer.email, "domain.remove", f"domain:{domain}")
        return Response(status_code=204)

    @app.get("/api/mailboxes", response_model=list[MailboxOut], tags=["team"])
    async def list_mailboxes(request: Request, viewer: Caller, limit: Limit = 100,
                             offset: Offset = 0) -> Response:
        items, more = _sliced([mailbox_json(b) for b in await mailboxes.all()], limit, offset)
        return _page(request, TypeAdapter(list[MailboxOut]), items, limit, offset, more)

    # --- the audit log -----------------------------------------------------------

    @app.get("/api/audit", response_model=list[AuditOut], tags=["audit"])
    async def list_audit(request: Request, viewer: Caller, limit: Limit = 100,
                         offset: Offset = 0) -> Response:
        await allowed(viewer, ROLES_THAT_AUDIT, "reading the audit log", "audit")
        found = await access.audit(limit + 1, offset)
        return _page(request, TypeAdapter(list[AuditOut]),
                     [audit_json(e) for e in found[:limit]], limit, offset, len(found) > limit)

    return app


def _methods_at(app: FastAPI, scope: Scope) -> set[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(scope["path"]):
            methods |= route.methods or set()
    return methods
