"""The `atsmail` command: thin click commands over the store and the gateway.

Exit codes: 0 success, 1 a user error (one line on stderr, no traceback),
2 bad usage. Every list or show command takes `--json` and then prints
exactly one JSON document on stdout.
"""

from __future__ import annotations

import asyncio
import csv
import getpass
import io
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from atsmail.config import Config, ConfigError, find_config_path, load_config, parse_host_port
from atsmail.gateway.sender import queue_message
from atsmail.rules import decide, read_message
from atsmail.secrets import SecretError, Secrets, create_key_file
from atsmail.storage import Store, UserError
from atsmail.storage.access import Access
from atsmail.storage.mailboxes import (
    OAUTH2_PROVIDERS,
    PROVIDERS,
    SECURITY,
    Account,
    Mailboxes,
    mailbox_json,
)
from atsmail.storage.models import FOLDER_ROLES, ROLES, SHARING_LEVELS
from atsmail.storage.outbox import Outbox, outbox_json
from atsmail.storage.retention import apply_retention
from atsmail.storage.store import job_json, member_json
from atsmail.storage.visibility import Viewer

# What `serve --event-loop` runs on.
EVENT_LOOPS = ("uvloop", "asyncio")

T = TypeVar("T")


def _config(ctx: click.Context) -> Config:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "config" not in obj:
        try:
            obj["config"] = load_config(find_config_path(obj.get("config_path")))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    config: Config = obj["config"]
    return config


def _actor() -> str:
    """Who ran a command, for the audit log."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


def _audited(ctx: click.Context, work: Callable[[Store], Awaitable[T]], action: str,
             target: str, **detail: Any) -> T:
    """Run `work`, then write what it did to the audit log (as the API does)."""

    async def both(store: Store) -> T:
        result = await work(store)
        await Access(store.db).record(_actor(), action, target, **detail)
        return result

    return _run(ctx, both)


def _run(ctx: click.Context, work: Callable[[Store], Awaitable[T]],
         check_schema: bool = True) -> T:
    """Open the store, run `work`, close it; user errors become exit 1."""
    config = _config(ctx)

    async def main() -> T:
        store = Store.open(config.storage.url)
        try:
            if check_schema:
                await store.ensure_current()
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        raise click.ClickException(_store_problem(config, exc)) from None


def _store_problem(config: Config, exc: Exception) -> str:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        where = make_url(config.storage.url).render_as_string(hide_password=True)
    except ArgumentError:
        where = "the configured storage.url"
    return f"cannot use the store at {where}: {detail}"


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _table(rows: list[list[str]], empty: str) -> None:
    if not rows:
        click.echo(empty)
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH",
              help="Configuration file (default: $ATSMAIL_CONFIG, else ./atsmail.toml).")
@click.version_option(package_name="atsmail")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """atsmail: capture candidate mail between your mail system and your ATS."""
    ctx.ensure_object(dict)["config_path"] = config_path


@main.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the store, or upgrade it to this version's schema."""
    config = _config(ctx)
    _run(ctx, lambda store: store.migrate(), check_schema=False)
    click.echo(f"store ready: {config.storage.url}")
    try:
        if create_key_file(config.secrets):
            click.echo(f"created the secret key {config.secrets.key_file} (mode 0600): keep it "
                       "safe and out of the database's backups")
    except OSError as exc:
        raise click.ClickException(f"cannot create the secret key: {exc}") from None


@main.command()
@click.option("-v", "--verbose", is_flag=True, help="Log every SMTP session too.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes accepting relay connections, sharing the listening socket "
                   "(one per core uses every core).")
@click.option("--event-loop", type=click.Choice(EVENT_LOOPS), default="uvloop", show_default=True,
              help="uvloop, the faster, or Python's own asyncio loop.")
@click.option("--relay-fd", "relay_fds", type=int, multiple=True, hidden=True,
              help="Run as a relay worker on this inherited listening socket.")
@click.option("--relay-parent", type=int, hidden=True,
              help="A relay worker's parent process, which it stops without.")
@click.pass_context
def serve(ctx: click.Context, verbose: bool, workers: int, event_loop: str,
          relay_fds: tuple[int, ...], relay_parent: int | None) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    from atsmail.gateway.server import run_on, serve_relay_worker
    from atsmail.gateway.server import serve as run_gateway
    from atsmail.malloc import keep_large_buffers_unmapped

    config = _config(ctx)
    keep_large_buffers_unmapped()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {os.getpid()} %(levelname)s %(name)s: %(message)s")
    # aiosmtpd logs every command at INFO; keep that for --verbose.
    logging.getLogger("mail.log").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if relay_fds:
            run_on(event_loop, serve_relay_worker(config, list(relay_fds),
                                                  relay_parent or os.getppid()))
        else:
            run_on(event_loop, run_gateway(config, workers, verbose, event_loop))
    except (UserError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    except SQLAlchemyError as exc:
        raise click.ClickException(_store_problem(config, exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None


@main.command()
@click.option("--older-than-days", type=click.IntRange(min=1), metavar="N",
              help="Purge what is older than N days instead of [capture] retention_days.")
@json_option
@click.pass_context
def purge(ctx: click.Context, older_than_days: int | None, as_json: bool) -> None:
    """Purge captured mail, and sent or failed outbox mail, older than retention_days, now.

    `serve` does this daily; the purge is written to the audit log.
    """
    days = older_than_days or _config(ctx).capture.retention_days
    if not days:
        click.echo("retention_days is 0 in [capture]: mail is kept until its candidate is "
                   "deleted, so nothing was purged", err=True)
        if as_json:
            _print_json({"messages": 0, "threads": 0, "outbox": 0, "cutoff": None,
                         "scrubbed": True})
        return
    result = _run(ctx, lambda s: apply_retention(s, days, "cli"))
    if as_json:
        _print_json(result.to_json())
    else:
        click.echo(f"purged {result.messages} messages, {result.threads} threads and "
                   f"{result.outbox} outbox messages from before {result.cutoff.isoformat()}")
    if not result.scrubbed:
        _warn_not_scrubbed("purged")


# --- the store's schema ------------------------------------------------------


@main.group()
def schema() -> None:
    """The store's schema: where it stands, and going back for an older atsmail."""


@schema.command("show")
@json_option
@click.pass_context
def schema_show(ctx: click.Context, as_json: bool) -> None:
    """The store's schema revision, against this version's migrations."""
    state = _run(ctx, lambda store: store.schema(), check_schema=False)
    applied = set(state.applied)
    if as_json:
        _print_json({"store": state.at, "this_version": state.head, "condition": state.condition,
                     "revisions": [{"revision": revision, "description": description,
                                    "applied": revision in applied}
                                   for revision, description in state.revisions]})
        return
    click.echo(state.summary)
    _table([[revision, "applied" if revision in applied else "-", description]
            for revision, description in state.revisions], "")


@schema.command("downgrade")
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Go ahead without asking.")
@click.option("--force", is_flag=True,
              help="Go ahead even though a gateway seems to run on the store.")
@click.pass_context
def schema_downgrade(ctx: click.Context, revision: str, yes: bool, force: bool) -> None:
    """Take the store back to REVISION, the schema an older atsmail needs.

    Run it with this version, before installing the older one, and with every
    `atsmail serve` on the store stopped: it refuses while a gateway's mirror
    shows it alive (a killed one's shows for up to [mirror] lease seconds).
    What the newer schemas hold goes with them: below 0009, for one, the
    webhook events not yet delivered.
    """
    state = _run(ctx, lambda store: store.schema(), check_schema=False)
    if state.at is None or not state.known:
        raise click.ClickException(state.summary)
    if revision not in state.ids:
        raise click.ClickException(f"unknown schema revision {revision!r}: this version has "
                                   f"{state.ids[0]} to {state.head}")
    target, at = state.ids.index(revision), state.ids.index(state.at)
    if target >= at:
        raise click.ClickException(
            f"the store is at {state.at}, not newer than {revision}: nothing to take back"
            + ("" if state.at == state.head else " (`atsmail init` upgrades it)"))
    # The mirrors' heartbeats came with 0010.
    alive = [] if at < state.ids.index("0010") else _run(
        ctx, lambda store: Mailboxes(store.db).alive(), check_schema=False)
    if alive and not force:
        raise click.ClickException(
            f"{len(alive)} gateway(s) run on this store ({', '.join(alive)}): stop every "
            "`atsmail serve` first (--force takes the store back all the same)")
    undone = state.revisions[target + 1:at + 1]
    click.echo(f"the store goes back from {state.at} to {revision}, undoing:")
    for undone_revision, description in reversed(undone):
        click.echo(f"  {undone_revision}  {description}")
    if not yes:
        click.confirm("go ahead?", abort=True)
    _run(ctx, lambda store: store.migrate(revision), check_schema=False)
    click.echo(f"the store is at {revision}: install the atsmail version that needs it")


# --- team members ------------------------------------------------------------


@main.group()
def user() -> None:
    """Team members: the recruiting team whose conversations are captured."""


@user.command("add")
@click.argument("email")
@click.option("--name", default="", help="Display name.")
@click.option("--role", type=click.Choice(ROLES), default="recruiter", show_default=True)
@click.pass_context
def user_add(ctx: click.Context, email: str, name: str, role: str) -> None:
    """Add a team member; their address is removed from any candidate."""
    removals = _audited(ctx, lambda s: s.add_team_member(email, name, role), "user.put",
                        f"user:{email}", role=role, created=True)
    click.echo(f"added team member {email.strip().lower()} ({role})")
    for removal in removals:
        click.echo(f"candidate {removal.candidate_id}: {removal.notice}", err=True)


@user.command("list")
@json_option
@click.pass_context
def user_list(ctx: click.Context, as_json: bool) -> None:
    """List the team members."""
    members = _run(ctx, lambda s: s.team())
    if as_json:
        _print_json([member_json(m) for m in members])
    else:
        _table([[m.email, m.role, m.name] for m in members], "no team members")


# --- internal domains --------------------------------------------------------


@main.group()
def domain() -> None:
    """Internal domains: their addresses are never kept on a candidate."""


@domain.command("add")
@click.argument("name")
@click.pass_context
def domain_add(ctx: click.Context, name: str) -> None:
    """Add an internal domain (subdomains count too)."""
    removals = _audited(ctx, lambda s: s.add_domain(name), "domain.add", f"domain:{name}")
    click.echo(f"added internal domain {name.strip().lower().removeprefix('@')}")
    for removal in removals:
        click.echo(f"candidate {removal.candidate_id}: {removal.notice}", err=True)


@domain.command("remove")
@click.argument("name")
@click.pass_context
def domain_remove(ctx: click.Context, name: str) -> None:
    """Remove an internal domain."""
    _audited(ctx, lambda s: s.remove_domain(name), "domain.remove", f"domain:{name}")
    click.echo(f"removed internal domain {name}")


@domain.command("list")
@json_option
@click.pass_context
def domain_list(ctx: click.Context, as_json: bool) -> None:
    """List the internal domains."""
    domains = _run(ctx, lambda s: s.domains())
    if as_json:
        _print_json([{"domain": d.domain, "created_at": d.created_at.isoformat()}
                     for d in domains])
    else:
        _table([[d.domain] for d in domains], "no internal domains")


# --- jobs --------------------------------------------------------------------


@main.group()
def job() -> None:
    """Jobs: candidates whose every job is archived are no longer captured."""


@job.command("add")
@click.argument("job_id")
@click.option("--title", required=True)
@click.pass_context
def job_add(ctx: click.Context, job_id: str, title: str) -> None:
    """Add an open job."""
    _run(ctx, lambda s: s.add_job(job_id, title))
    click.echo(f"added job {job_id}")


@job.command("archive")
@click.argument("job_id")
@click.pass_context
def job_archive(ctx: click.Context, job_id: str) -> None:
    """Archive a job: its candidates stop syncing unless active elsewhere."""
    _run(ctx, lambda s: s.set_job_archived(job_id, True))
    click.echo(f"archived job {job_id}")


@job.command("reopen")
@click.argument("job_id")
@click.pass_context
def job_reopen(ctx: click.Context, job_id: str) -> None:
    """Reopen an archived job."""
    _run(ctx, lambda s: s.set_job_archived(job_id, False))
    click.echo(f"reopened job {job_id}")


@job.command("list")
@json_option
@click.pass_context
def job_list(ctx: click.Context, as_json: bool) -> None:
    """List the jobs."""
    jobs = _run(ctx, lambda s: s.jobs())
    if as_json:
        _print_json([job_json(j, n) for j, n in jobs])
    else:
        _table([[j.id, "archived" if j.archived else "open", f"{n} candidates", j.title]
                for j, n in jobs], "no jobs")


# --- candidates --------------------------------------------------------------


@main.group()
def candidate() -> None:
    """Candidates: the people whose conversations are captured."""


@candidate.command("add")
@click.argument("candidate_id")
@click.option("--name", required=True)
@click.option("--email", "emails", multiple=True, required=True, help="Repeat for more.")
@click.option("--job", "jobs", multiple=True, help="A job id; repeat for more.")
@click.pass_context
def candidate_add(ctx: click.Context, candidate_id: str, name: str, emails: tuple[str, ...],
                  jobs: tuple[str, ...]) -> None:
    """Add a candidate with their addresses and jobs."""
    refused = _run(ctx, lambda s: s.add_candidate(candidate_id, name, emails, jobs))
    click.echo(f"added candidate {candidate_id}")
    for text in refused:
        click.echo(f"warning: {text}", err=True)


@candidate.command("show")
@click.argument("candidate_id")
@json_option
@click.pass_context
def candidate_show(ctx: click.Context, candidate_id: str, as_json: bool) -> None:
    """Show a candidate: addresses, jobs and notices."""
    view = _run(ctx, lambda s: s.candidate(candidate_id))
    if as_json:
        _print_json(view.to_json())
        return
    click.echo(f"{view.id}  {view.name}")
    click.echo(f"  emails: {', '.join(view.emails) or '-'}")
    jobs = [f"{j} (archived)" if archived else j for j, archived in view.jobs]
    click.echo(f"  jobs:   {', '.join(jobs) or '-'}")
    for text, at in view.notices:
        click.echo(f"  notice {at:%Y-%m-%d %H:%M}: {text}")


@candidate.command("list")
@json_option
@click.pass_context
def candidate_list(ctx: click.Context, as_json: bool) -> None:
    """List the candidates."""
    views = _run(ctx, lambda s: s.candidates())
    if as_json:
        _print_json([v.to_json() for v in views])
    else:
        _table([[v.id, v.name, ", ".join(v.emails)] for v in views], "no candidates")


@candidate.command("delete")
@click.argument("candidate_id")
@click.pass_context
def candidate_delete(ctx: click.Context, candidate_id: str) -> None:
    """Erase a candidate and everything captured only for them."""
    erased, scrubbed = _audited(ctx, lambda s: s.delete_candidate(candidate_id), "erase",
                                f"candidate:{candidate_id}")
    click.echo(f"deleted candidate {candidate_id} and erased {erased} messages")
    if not scrubbed:
        _warn_not_scrubbed("erased")


def _warn_not_scrubbed(what: str) -> None:
    click.echo(f"warning: other readers kept the store's write-ahead log busy, so the {what} "
               "text may still be in atsmail.db-wal until the next checkpoint", err=True)


@candidate.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8-sig"))
@click.pass_context
def candidate_import(ctx: click.Context, file: io.TextIOBase) -> None:
    """Add candidates from JSON Lines or CSV (id, name, emails, jobs).

    In CSV, several emails or jobs in one cell are separated by `;`.
    Every good record is added; each bad one is reported with its line,
    and the command then exits 1.
    """
    text = file.read()
    try:
        records = list(_import_records(text))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None

    async def work(store: Store) -> tuple[int, list[str]]:
        added = 0
        problems: list[str] = []
        for line, record in records:
            try:
                if isinstance(record, str):
                    raise UserError(record)
                refused = await store.add_candidate(*record)
                added += 1
                problems.extend(f"line {line}: warning: {t}" for t in refused)
            except UserError as exc:
                problems.append(f"line {line}: {exc}")
        return added, problems

    added, problems = _run(ctx, work)
    click.echo(f"imported {added} candidates")
    for problem in problems:
        click.echo(problem, err=True)
    if any("warning:" not in p for p in problems):
        raise click.ClickException(f"{len(records) - added} records were not imported")


Record = tuple[str, str, list[str], list[str]]


def _import_records(text: str) -> Iterator[tuple[int, Record | str]]:
    """(line number, record or the problem with it) for each record."""
    if text.lstrip().startswith("{"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, f"not JSON: {exc.msg}"
                continue
            yield number, _record(item)
        return
    reader = csv.DictReader(io.StringIO(text))
    missing = {"id", "name"} - set(reader.fieldnames or ())
    if missing or not ({"email", "emails"} & set(reader.fieldnames or ())):
        raise ValueError("CSV needs a header with id, name, emails (or email) and "
                         "optionally jobs (or job)")
    for row in reader:
        item = {
            "id": row.get("id"),
            "name": row.get("name"),
            "emails": _split(row.get("emails") or row.get("email") or ""),
            "jobs": _split(row.get("jobs") or row.get("job") or ""),
        }
        yield reader.line_num, _record(item)


def _split(cell: str) -> list[str]:
    return [part.strip() for part in cell.replace(",", ";").split(";") if part.strip()]


def _record(item: Any) -> Record | str:
    if not isinstance(item, dict):
        return "expected an object with id, name, emails, jobs"
    unknown = set(item) - {"id", "name", "emails", "email", "jobs", "job"}
    if unknown:
        return f"unknown fields: {', '.join(sorted(unknown))}"
    emails = item.get("emails", item.get("email", []))
    jobs = item.get("jobs", item.get("job", []))
    emails = [emails] if isinstance(emails, str) else emails
    jobs = [jobs] if isinstance(jobs, str) else jobs
    cid, name = item.get("id"), item.get("name")
    if not isinstance(cid, str) or not isinstance(name, str) or not name.strip():
        return "id and name must be non-empty strings"
    if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
        return "emails must be a list of strings"
    if not isinstance(jobs, list) or not all(isinstance(j, str) for j in jobs):
        return "jobs must be a list of strings"
    return cid, name, emails, jobs


# --- captured mail -----------------------------------------------------------


as_option = click.option(
    "--as", "viewer", metavar="USER_EMAIL",
    help="Show only what this team member may see (shared mailboxes, sharing levels).")


async def _with_viewer(store: Store, email: str | None,
                       read: Callable[[Viewer | None], Awaitable[T]]) -> T:
    return await read(await store.viewer(email) if email else None)


@main.command()
@click.option("--candidate", "candidate_id", metavar="CANDIDATE_ID")
@as_option
@json_option
@click.pass_context
def threads(ctx: click.Context, candidate_id: str | None, viewer: str | None,
            as_json: bool) -> None:
    """List captured threads, newest first."""
    found = _run(ctx, lambda s: _with_viewer(s, viewer, lambda v: s.threads(candidate_id, v)))
    if as_json:
        _print_json([t.to_json() for t in found])
    else:
        _table([[str(t.id), f"{t.last_date:%Y-%m-%d %H:%M}", ",".join(t.candidates),
                 f"{t.message_count} msg", t.subject] for t in found], "no threads")


@main.group()
def thread() -> None:
    """One captured thread."""


@thread.command("show")
@click.argument("thread_id", type=int)
@as_option
@json_option
@click.pass_context
def thread_show(ctx: click.Context, thread_id: int, viewer: str | None, as_json: bool) -> None:
    """Show a thread's messages."""
    detail = _run(ctx, lambda s: _with_viewer(s, viewer, lambda v: s.thread(thread_id, v)))
    if as_json:
        data = detail.to_json()
        for message in data["messages"]:
            message.pop("trace", None)
        _print_json(data)
        return
    click.echo(f"thread {detail.id}: {detail.subject}")
    click.echo(f"candidates: {', '.join(detail.candidates)}")
    for m in detail.messages:
        click.echo(f"  {m['date'] or '-':25}  {m['direction']:8}  {m['from']} -> "
                   f"{', '.join(m['to'])}  [{m['source']}]  {m['subject']}")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--mail-from", help="Envelope sender, as the relay would see it.")
@click.option("--rcpt", multiple=True, help="Envelope recipient; repeat for more.")
@json_option
@click.pass_context
def explain(ctx: click.Context, file: Path, mail_from: str | None, rcpt: tuple[str, ...],
            as_json: bool) -> None:
    """Would this message be captured, and why? Runs the rules against the store."""
    facts = read_message(file.read_bytes(), mail_from, rcpt)
    config = _config(ctx)
    context = _run(ctx, lambda s: s.context_for(facts, config.capture.capture_forwards))
    decision = decide(facts, context)
    if as_json:
        _print_json({"capture": decision.capture, "candidates": list(decision.candidates),
                     "thread": decision.thread, "direction": decision.direction,
                     "message_id": facts.message_id,
                     "trace": [t.to_json() for t in decision.trace]})
        return
    verdict = "CAPTURE" if decision.capture else "PASS (not captured)"
    click.echo(f"{verdict}: {facts.message_id or '(no Message-ID)'}")
    if decision.capture:
        click.echo(f"  candidates: {', '.join(decision.candidates)}; "
                   f"thread: {decision.thread}; direction: {decision.direction}")
    for entry in decision.trace:
        click.echo(f"  {entry.rule:16} {entry.verdict:5} {'; '.join(entry.reasons)}")


# --- mailboxes -----------------------------------------------------------------

# Where each provider's servers are, and the SMTP server's TLS, unless
# --imap/--smtp/--smtp-security say otherwise.
PRESETS = {
    "gmail": ("imap.gmail.com:993", "smtp.gmail.com:465", "ssl"),
    "outlook": ("outlook.office365.com:993", "smtp.office365.com:587", "starttls"),
}


@main.group()
def mailbox() -> None:
    """Connected mailboxes, whose incoming and outgoing folders are mirrored."""


@mailbox.command("connect")
@click.argument("address")
@click.option("--provider", type=click.Choice(PROVIDERS), required=True)
@click.option("--owner", metavar="USER_EMAIL", help="The team member whose mailbox it is.")
@click.option("--shared", is_flag=True, help="A shared mailbox such as jobs@.")
@click.option("--visible-to", "visible_to", multiple=True, metavar="USER_EMAIL",
              help="Who may see a shared mailbox's mail; repeat for more.")
@click.option("--imap", "imap_at", metavar="HOST:PORT",
              help="IMAP server (preset for gmail and outlook).")
@click.option("--smtp", "smtp_at", metavar="HOST:PORT",
              help="SMTP server for sending (preset for gmail and outlook).")
@click.option("--security", type=click.Choice(SECURITY), default="ssl", show_default=True,
              help="The IMAP server's TLS. ssl: implicit TLS; starttls; none: plaintext, "
                   "only when asked for.")
@click.option("--smtp-security", type=click.Choice(SECURITY),
              help="The SMTP server's TLS (default: the preset's, else as --security).")
@click.option("--username", help="Login name (default: the address).")
@click.option("--password-env", metavar="VAR", help="Read the password from this variable.")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the password from this file.")
@click.option("--refresh-token-env", metavar="VAR",
              help="gmail, outlook: log in with OAuth2, from the refresh token in this variable.")
@click.option("--refresh-token-file", type=click.Path(exists=True, dir_okay=False,
                                                      path_type=Path),
              help="gmail, outlook: log in with OAuth2, from the refresh token in this file.")
@click.option("--signature-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def mailbox_connect(ctx: click.Context, address: str, provider: str, owner: str | None,
                    shared: bool, visible_to: tuple[str, ...], imap_at: str | None,
                    smtp_at: str | None, security: str, smtp_security: str | None,
                    username: str | None, password_env: str | None, password_file: Path | None,
                    refresh_token_env: str | None, refresh_token_file: Path | None,
                    signature_file: Path | None) -> None:
    """Connect a mailbox: the mirror starts syncing it with the next `serve`.

    It logs in with a password (for gmail and outlook: an app password), or,
    for gmail and outlook, with OAuth2 from a refresh token the provider
    issued to the client set up in [oauth.gmail] or [oauth.outlook].
    """
    config = _config(ctx)
    if shared and owner:
        raise click.UsageError("give --owner or --shared, not both")
    if not shared and not owner:
        raise click.UsageError("give --owner USER_EMAIL, or --shared --visible-to USER_EMAIL")
    if shared and not visible_to:
        raise click.UsageError("a --shared mailbox needs at least one --visible-to USER_EMAIL")
    preset = PRESETS.get(provider)
    if smtp_security is None:
        smtp_security = preset[2] if preset and not smtp_at else security
    imap_at = imap_at or (preset[0] if preset else "")
    smtp_at = smtp_at or (preset[1] if preset else "")
    if not imap_at:
        raise click.UsageError("--imap HOST:PORT is needed for provider imap")
    given = [o for o, v in (("--password-env", password_env), ("--password-file", password_file),
                            ("--refresh-token-env", refresh_token_env),
                            ("--refresh-token-file", refresh_token_file)) if v]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --password-env VAR, --password-file FILE, "
                               "--refresh-token-env VAR or --refresh-token-file FILE")
    auth = "oauth2" if refresh_token_env or refresh_token_file else "password"
    if auth == "oauth2":
        if provider not in OAUTH2_PROVIDERS:
            raise click.UsageError(f"{given[0]} is for gmail and outlook mailboxes; a {provider} "
                                   "mailbox logs in with --password-env or --password-file")
        if not config.oauth.client(provider).configured:
            raise click.ClickException(
                f"no OAuth2 client for {provider}: set [oauth.{provider}] client_id in "
                f"{config.path} (see config.example.toml)")
    secret = _secret(password_env or refresh_token_env, password_file or refresh_token_file)
    try:
        imap_host, imap_port = parse_host_port(imap_at)
        smtp_host, smtp_port = parse_host_port(smtp_at) if smtp_at else ("", 0)
        sealed = Secrets.load(config.secrets).seal(secret)
    except (ValueError, SecretError) as exc:
        raise click.ClickException(str(exc)) from None
    account = Account(
        address=address, provider=provider, owner=owner, shared=shared, visible_to=visible_to,
        imap_host=imap_host, imap_port=imap_port, smtp_host=smtp_host, smtp_port=smtp_port,
        security=security, smtp_security=smtp_security, auth=auth,
        username=username or address.strip(), sealed_secret=sealed,
        signature=signature_file.read_text(encoding="utf-8") if signature_file else "")
    _run(ctx, lambda s: Mailboxes(s.db).connect(account))
    click.echo(f"connected {address.strip().lower()}; `atsmail serve` keeps it in sync")


def _secret(env: str | None, file: Path | None) -> str:
    """A password or refresh token from a variable or a file, never from the command line."""
    if env:
        value = os.environ.get(env, "")
        if not value:
            raise click.ClickException(f"${env} is empty or not set")
        return value
    assert file is not None
    value = file.read_text(encoding="utf-8").rstrip("\r\n")
    if not value:
        raise click.ClickException(f"{file} is empty")
    return value


@mailbox.command("list")
@json_option
@click.pass_context
def mailbox_list(ctx: click.Context, as_json: bool) -> None:
    """Each mailbox with its state, last sync and last error."""
    boxes = _run(ctx, lambda s: Mailboxes(s.db).all())
    if as_json:
        _print_json([mailbox_json(b) for b in boxes])
        return
    _table([[b.address, b.provider, b.owner or "shared: " + ",".join(b.visible_to), b.state,
             f"{b.last_sync:%Y-%m-%d %H:%M}" if b.last_sync else "never", b.last_error or ""]
            for b in boxes], "no mailboxes")


@mailbox.command("folders")
@click.argument("address")
@json_option
@click.pass_context
def mailbox_folders(ctx: click.Context, address: str, as_json: bool) -> None:
    """Each folder the mirror has seen, and its role."""
    folders = _run(ctx, lambda s: Mailboxes(s.db).folders(address))
    if as_json:
        _print_json([f.to_json() for f in folders])
        return
    _table([[f.name, f.role, f.special_use] for f in folders],
           "no folders seen yet (they are listed once the mirror has connected)")


@mailbox.command("set-role")
@click.argument("address")
@click.argument("folder")
@click.argument("role", type=click.Choice(FOLDER_ROLES))
@click.pass_context
def mailbox_set_role(ctx: click.Context, address: str, folder: str, role: str) -> None:
    """Make a folder incoming, outgoing, or not synced (none)."""
    _run(ctx, lambda s: Mailboxes(s.db).set_role(address, folder, role))
    click.echo(f"{address} {folder}: {role}")


@mailbox.command("set-sharing")
@click.argument("address")
@click.argument("level", type=click.Choice(SHARING_LEVELS))
@click.pass_context
def mailbox_set_sharing(ctx: click.Context, address: str, level: str) -> None:
    """How much of a personal mailbox's mail the rest of the team sees.

    full: everything; subject: no bodies; metadata: participants and dates only.
    The owner, the people taking part and compliance always see everything.
    """
    _run(ctx, lambda s: Mailboxes(s.db).set_sharing(address, level))
    click.echo(f"{address}: the team sees {level}")


@mailbox.command("disconnect")
@click.argument("address")
@click.pass_context
def mailbox_disconnect(ctx: click.Context, address: str) -> None:
    """Stop mirroring a mailbox and forget its password or refresh token."""
    _run(ctx, lambda s: Mailboxes(s.db).disconnect(address))
    click.echo(f"disconnected {address}")


# --- API tokens ------------------------------------------------------------------


@main.group()
def token() -> None:
    """API tokens: a team member's key to the HTTP API and the review pages."""


@token.command("create")
@click.argument("user_email")
@json_option
@click.pass_context
def token_create(ctx: click.Context, user_email: str, as_json: bool) -> None:
    """Make a token for a team member; it is shown this once only."""
    token_id, secret = _run(ctx, lambda s: Access(s.db).create_token(user_email, _actor()))
    if as_json:
        _print_json({"token": secret, "id": token_id})
    else:
        click.echo(secret)
        click.echo(f"token {token_id} for {user_email}: keep it now, it is not shown again",
                   err=True)


@token.command("list")
@json_option
@click.pass_context
def token_list(ctx: click.Context, as_json: bool) -> None:
    """The tokens, whose they are and when they were last used (never the tokens)."""
    found = _run(ctx, lambda s: Access(s.db).tokens())
    if as_json:
        _print_json([t.to_json() for t in found])
    else:
        _table([[str(t.id), t.member, "revoked" if t.revoked_at else "live",
                 f"last used {t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never used"]
                for t in found], "no tokens")


@token.command("revoke")
@click.argument("token_id", type=int)
@click.pass_context
def token_revoke(ctx: click.Context, token_id: int) -> None:
    """Revoke a token at once."""
    _run(ctx, lambda s: Access(s.db).revoke_token(token_id, _actor()))
    click.echo(f"revoked token {token_id}")


@main.group()
def identity() -> None:
    """ATS-hosted identities: the address a team member sends from without a mailbox."""


@identity.command("hosted")
@click.argument("user_email")
@click.argument("address")
@click.pass_context
def identity_hosted(ctx: click.Context, user_email: str, address: str) -> None:
    """Give a team member an ATS-hosted address."""
    _run(ctx, lambda s: Mailboxes(s.db).set_hosted_identity(user_email, address))
    click.echo(f"{user_email} now has the hosted identity {address}")


# --- sending -------------------------------------------------------------------


@main.command()
@click.option("--as", "sender", required=True, metavar="USER_EMAIL",
              help="The team member it is sent for.")
@click.option("--to", "recipients", required=True, multiple=True, metavar="ADDRESS",
              help="A recipient; repeat for more.")
@click.option("--subject", required=True)
@click.option("--body-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--body", "body_text", metavar="TEXT")
@click.option("--candidate", "candidate_id", metavar="CANDIDATE_ID",
              help="File it on this candidate even if the address is not theirs.")
@click.option("--thread", "thread_id", type=int, metavar="THREAD_ID",
              help="Answer in this thread (In-Reply-To its latest message).")
@click.option("--from", "from_address", metavar="ADDRESS",
              help="Send from this mailbox: a shared one the member is listed on, or their "
                   "own (default: their own mailbox, else their hosted identity).")
@json_option
@click.pass_context
def send(ctx: click.Context, sender: str, recipients: tuple[str, ...], subject: str,
         body_file: Path | None, body_text: str | None, candidate_id: str | None,
         thread_id: int | None, from_address: str | None, as_json: bool) -> None:
    """Queue a message in the outbox; `serve` sends it from the member's mailbox."""
    if (body_file is None) == (body_text is None):
        raise click.UsageError("give exactly one of --body-file F or --body TEXT")
    body = body_file.read_text(encoding="utf-8") if body_file else str(body_text)

    item = _run(ctx, lambda s: queue_message(s.db, sender, recipients, subject, body,
                                             candidate_id, thread_id, from_address))
    if as_json:
        _print_json({"id": item.id, "message_id": item.message_id, "status": item.status})
    else:
        click.echo(f"queued as {item.id} <{item.message_id}> from {item.from_address}")


@main.command()
@json_option
@click.pass_context
def outbox(ctx: click.Context, as_json: bool) -> None:
    """Mail queued or sent from the ATS, with attempts and the last error."""
    items = _run(ctx, lambda s: Outbox(s.db).all())
    if as_json:
        _print_json([outbox_json(i) for i in items])
        return
    _table([[str(i.id), i.status, f"{i.attempts} tries", i.from_address,
             ", ".join(i.recipients), i.last_error or ""] for i in items], "the outbox is empty")
