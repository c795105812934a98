"""Throughput and latency of the atsmail relay beside a bare proxy and a direct sink.

Why: the relay is a before-queue proxy that parses every message, asks the
rules and durably commits candidate mail before it answers the end of DATA.
Issue 2 asks it to pass at least 70% of what a bare aiosmtpd→aiosmtplib
proxy passes on the same machine, in the same run. This script measures that,
on loopback only, in one bounded run that stops by itself.

How: everything runs in separate processes so the figures do not share an
event loop:

- a fast SMTP sink: Postfix's `smtp-sink` when it is on the PATH (optional;
  Debian package `postfix`, installed without starting the daemon by putting
  a `policy-rc.d` that exits 101 in place first), else a minimal aiosmtpd sink
  started from this file;
- the bare proxy, written here: aiosmtpd in front, aiosmtplib behind, MAIL,
  RCPT and DATA passed on in lockstep, no parsing and no capture; on
  uvloop, with upstream connections kept from one client connection to the
  next, as the relay runs and keeps them;
- the atsmail relay: `python -m atsmail serve` on a generated config in a
  temporary directory, with an SQLite store made by `atsmail init` and seeded
  with a team member (recruiter@company.test), an internal domain
  (company.test), one open job and `--candidates` candidates;
- the load generator, from this file: a raw-socket asyncio SMTP client that
  keeps `--sessions` connections busy, sends several messages per connection
  (no pipelining), and times each message from MAIL FROM to the 250 after
  DATA.

The same `--messages` messages of about `--size` bytes are sent along three
paths: client → sink, client → bare proxy → sink, client → relay → sink. A
message is plain text, or with `--attachment` a short text part and a
base64 attachment that makes up the size, as a CV arrives. Every
second message is candidate mail (recruiter@company.test → a candidate, a
unique Message-ID each), the others company mail that concerns no candidate
and passes untouched. At the end the table shows messages/s, p50/p99 latency,
errors, and the peak RSS (VmHWM) and CPU seconds used under load of the proxy
or relay process; then the relay's share of the bare proxy's rate, and
whether the store holds exactly one captured message per candidate message
the relay accepted (exit status 1 when not, or on any error).

Reading the figures: the direct path is bounded by the Python load generator
itself (`--load-procs 2` spreads it), so it shows the harness's ceiling, not
smtp-sink's. A CPU figure close to the seconds column means that process is
CPU-bound. `--py-spy FILE` (optional, `pip install py-spy`) records the
relay under load, sampling only the thread holding the GIL; a `.txt` FILE
gives folded stacks to sum up, `.svg` a flame graph.

Usage:

    python bench/relay.py [--messages N] [--sessions M] [--size BYTES] [--attachment]
                          [--candidates K] [--per-connection P] [--load-procs L]
                          [--timeout SECONDS] [--py-spy FILE] [--keep]

Requires `pip install -e .` (atsmail, aiosmtpd, aiosmtplib). A default run
takes well under two minutes on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
RECRUITER = "recruiter@company.test"
INTERNAL_DOMAIN = "company.test"
JOB_ID = "bench-job"
REPLY_TIMEOUT = 30.0
START_TIMEOUT = 30.0


def candidate_address(n: int) -> str:
    return f"candidate{n}@candidates.test"


# --- small process helpers ----------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[Any], log: Path | None) -> None:
    """Wait until something answers on `port`, or fail with the process's log."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"process {process.args!r} did not listen on port {port}\n"
                     f"{log_tail(log) if log else ''}")


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def status_kib(pid: int, field: str) -> int | None:
    """A size of a live process from /proc (VmRSS, VmHWM...), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a live process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime 14 and stime 15 (man 5 proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(process: subprocess.Popen[Any], grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def this_script(role: str, *args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), role, *map(str, args)]


class Processes:
    """Every child started here, stopped (by its own pid) when the run ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[subprocess.Popen[Any]] = []
        self.logs: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str], *, pipes: bool = False,
              ) -> tuple[subprocess.Popen[Any], Path]:
        """Start `argv` with its stderr (and stdout, unless `pipes`) in NAME.log."""
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("ab")
        self.logs.append(log)
        if pipes:
            process: subprocess.Popen[Any] = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                cwd=self.workdir, text=True)
        else:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       cwd=self.workdir)
        self.children.append(process)
        return process, log_path

    def stop_all(self) -> None:
        for process in reversed(self.children):
            stop_process(process)
        for log in self.logs:
            log.close()


# --- the sinks and the bare proxy (child processes) ---------------------------


def run_aiosmtpd_sink(port: int) -> None:
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Sink:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            return "250 2.0.0 Ok: queued"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Sink()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink.bench.test", ident="bench-sink"),
            host=HOST, port=port, backlog=512)
        await serve_until_signal(server)

    asyncio.run(main())


def run_bare_proxy(port: int, upstream_port: int, shared: bool = False) -> None:
    """aiosmtpd → aiosmtplib in lockstep: the floor any before-queue proxy pays.

    Given what the relay has for speed and is not proxying itself: uvloop,
    and upstream connections kept from one client connection to the next.
    `shared`: several such processes listen on the port (SO_REUSEPORT).
    """
    import aiosmtplib
    import uvloop
    from aiosmtpd.smtp import SMTP, Envelope, Session

    idle: list[aiosmtplib.SMTP] = []

    class ProxyProtocol(SMTP):
        upstream: aiosmtplib.SMTP | None = None
        # A transaction begun upstream and not ended: its connection is not reused.
        open_transaction = False

        def connection_lost(self, error: Exception | None) -> None:
            super().connection_lost(error)
            upstream, self.upstream = self.upstream, None
            if upstream is None:
                return
            if upstream.is_connected and not self.open_transaction:
                idle.append(upstream)
            else:
                upstream.close()

    def answer(exc: aiosmtplib.SMTPException) -> str:
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return f"{exc.code} {' '.join(exc.message.split())}"
        return "451 4.4.2 Upstream failed"

    class Proxy:
        async def handle_MAIL(self, server: ProxyProtocol, session: Session,
                              envelope: Envelope, address: str,
                              mail_options: list[str]) -> str:
            try:
                while server.upstream is None and idle:
                    kept = idle.pop()
                    if kept.is_connected:
                        server.upstream = kept
                    else:
                        kept.close()
                if server.upstream is None or not server.upstream.is_connected:
                    server.upstream = aiosmtplib.SMTP(
                        hostname=HOST, port=upstream_port, start_tls=False,
                        local_hostname="proxy.bench.test", timeout=REPLY_TIMEOUT)
                    await server.upstream.connect()
                server.open_transaction = True
                reply = await server.upstream.mail(address)
            except aiosmtplib.SMTPException as exc:
                return answer(exc)
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            return f"{reply.code} {reply.message}"

        async def handle_RCPT(self, server: ProxyProtocol, session: Session,
                              envelope: Envelope, address: str,
                              rcpt_options: list[str]) -> str:
            if server.upstream is None:
                return "451 4.4.2 No upstream session"
            try:
                reply = await server.upstream.rcpt(address)
            except aiosmtplib.SMTPException as exc:
                return answer(exc)
            envelope.rcpt_tos.append(address)
            return f"{reply.code} {reply.message}"

        async def handle_DATA(self, server: ProxyProtocol, session: Session,
                              envelope: Envelope) -> str:
            if server.upstream is None:
                return "451 4.4.2 No upstream session"
            try:
                reply = await server.upstream.data(envelope.original_content or b"")
            except aiosmtplib.SMTPException as exc:
                return answer(exc)
            server.open_transaction = False
            return f"{reply.code} {reply.message}"

        async def handle_RSET(self, server: ProxyProtocol, session: Session,
                              envelope: Envelope) -> str:
            if server.upstream is not None and server.upstream.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException):
                    await server.upstream.rset()
                    server.open_transaction = False
            return "250 2.0.0 Ok"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Proxy()
        server = await loop.create_server(
            lambda: ProxyProtocol(handler, hostname="proxy.bench.test", ident="bench-proxy"),
            host=HOST, port=port, backlog=512, reuse_port=shared)
        await serve_until_signal(server)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def serve_until_signal(server: asyncio.Server) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


# --- the load generator (child process) ---------------------------------------


def make_body(size: int) -> bytes:
    """About `size` bytes of plain text with CRLF lines, none starting with a dot."""
    line = b"The quick brown fox jumps over the lazy dog; lorem ipsum dolor sit amet. "
    lines: list[bytes] = []
    total = 0
    n = 0
    while total < size:
        chunk = b"%05d " % n + line + b"\r\n"
        lines.append(chunk)
        total += len(chunk)
        n += 1
    return b"".join(lines)


ATTACHED = "attached-file"


def make_attached(size: int) -> tuple[str, bytes]:
    """A message's Content-Type and a body of about `size` bytes: a line of
    text and a base64 attachment of random bytes (a PDF, say)."""
    raw = random.Random(size).randbytes(size * 57 // 78)  # 57 bytes a 78-byte line
    encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    body = (f"--{ATTACHED}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            "Please find my CV attached.\r\n\r\n"
            f"--{ATTACHED}\r\nContent-Type: application/pdf; name=cv.pdf\r\n"
            "Content-Disposition: attachment; filename=cv.pdf\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode()
    return (f'multipart/mixed; boundary="{ATTACHED}"',
            body + encoded + f"--{ATTACHED}--\r\n".encode())


@dataclass
class LoadResult:
    started: float = 0.0
    finished: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    ok_candidate: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text)


class Failed(Exception):
    """An SMTP reply other than the one expected."""


async def run_load(result: LoadResult, port: int, first: int, count: int, sessions: int,
                   size: int, candidates: int, per_connection: int, tag: str,
                   attachment: bool = False) -> None:
    """Send messages `first`..`first + count - 1`, recording into `result`."""
    content_type, body = (make_attached(max(0, size - 700)) if attachment else
                          ("text/plain; charset=us-ascii", make_body(max(0, size - 400))))
    indexes = iter(range(first, first + count))

    def message(index: int) -> tuple[bytes, bytes, bytes, bool]:
        is_candidate = index % 2 == 0
        if is_candidate:
            sender, recipient = RECRUITER, candidate_address((index // 2) % candidates)
            subject = f"Your application, step {index}"
        else:
            sender, recipient = f"staff{index % 50}@{INTERNAL_DOMAIN}", "orders@supplier.test"
            subject = f"Purchase order {index}"
        headers = (
            f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 06 Jan 2025 10:00:00 +0000\r\n"
            f"Message-ID: <{tag}.{index}@bench.company.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n"
        ).encode()
        return sender.encode(), recipient.encode(), headers, is_candidate

    async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("connection closed by the server")
            if line[3:4] != b"-":
                return int(line[:3]), line.rstrip()

    async def expect(reader: asyncio.StreamReader, code: int) -> None:
        got, text = await reply(reader)
        if got != code:
            raise Failed(text.decode(errors="replace"))

    async def one_connection() -> bool:
        """Send up to `per_connection` messages; False when there are none left."""
        index = next(indexes, None)
        if index is None:
            return False
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                reader, writer = await asyncio.open_connection(HOST, port)
                await expect(reader, 220)
                writer.write(b"EHLO load.bench.test\r\n")
                await expect(reader, 250)
        except (OSError, TimeoutError, Failed, ValueError) as exc:
            result.error(f"connect: {exc!r}")
            return True
        try:
            sent = 0
            while index is not None:
                sender, recipient, headers, is_candidate = message(index)
                began = time.perf_counter()
                try:
                    async with asyncio.timeout(REPLY_TIMEOUT):
                        writer.write(b"MAIL FROM:<%s>\r\n" % sender)
                        await expect(reader, 250)
                        writer.write(b"RCPT TO:<%s>\r\n" % recipient)
                        await expect(reader, 250)
                        writer.write(b"DATA\r\n")
                        await expect(reader, 354)
                        writer.writelines((headers, body, b".\r\n"))
                        await expect(reader, 250)
                except Failed as exc:
                    result.error(str(exc))
                    writer.write(b"RSET\r\n")
                    await asyncio.wait_for(reply(reader), REPLY_TIMEOUT)
                else:
                    result.latencies_ms.append((time.perf_counter() - began) * 1000)
                    result.ok += 1
                    result.ok_candidate += is_candidate
                sent += 1
                index = next(indexes, None) if sent < per_connection else None
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(OSError, TimeoutError, ConnectionError, ValueError):
                await asyncio.wait_for(reply(reader), 5)
        except (OSError, TimeoutError, ConnectionError, ValueError) as exc:
            result.error(f"session: {exc!r}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return True

    async def session() -> None:
        while await one_connection():
            pass

    result.started = time.monotonic()
    await asyncio.gather(*(session() for _ in range(sessions)))
    result.finished = time.monotonic()


def run_load_process(args: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="relay.py _load")
    for name in ("port", "first", "count", "sessions", "size", "candidates",
                 "per_connection"):
        parser.add_argument(name, type=int)
    parser.add_argument("tag")
    parser.add_argument("timeout", type=float)
    parser.add_argument("attachment", type=int)
    ns = parser.parse_args(args)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        return

    result = LoadResult()

    async def main() -> None:
        async with asyncio.timeout(ns.timeout):
            await run_load(result, ns.port, ns.first, ns.count, ns.sessions, ns.size,
                           ns.candidates, ns.per_connection, ns.tag, bool(ns.attachment))

    try:
        asyncio.run(main())
    except TimeoutError:
        result.finished = time.monotonic()
        unanswered = ns.count - result.ok - result.errors
        result.errors += unanswered
        result.error_samples.append(
            f"timed out after {ns.timeout:.0f} s with {unanswered} messages unanswered")
    sys.stdout.write(json.dumps(result.__dict__) + "\n")
    sys.stdout.flush()


# --- the orchestrator -------------------------------------------------------------


@dataclass
class PathResult:
    path: str
    messages: int
    seconds: float
    ok: int
    ok_candidate: int
    errors: int
    latencies_ms: list[float]
    rss_kib: int | None
    cpu_s: float | None
    error_samples: list[str]

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
        return ordered[rank]


def drive(procs: Processes, key: str, name: str, port: int, opts: argparse.Namespace,
          watched_pid: int | None) -> PathResult:
    """Run the load generator(s) against `port` and collect one row of the table."""
    loaders: list[tuple[subprocess.Popen[str], Path]] = []
    cpu_before = cpu_seconds(watched_pid) if watched_pid is not None else None
    share, extra = divmod(opts.messages, opts.load_procs)
    first = 0
    for n in range(opts.load_procs):
        count = share + (1 if n < extra else 0)
        sessions = max(1, opts.sessions // opts.load_procs
                       + (1 if n < opts.sessions % opts.load_procs else 0))
        argv = this_script("_load", port, first, count, sessions, opts.size,
                           opts.candidates, opts.per_connection, f"{key}-{os.getpid()}",
                           opts.timeout, int(opts.attachment))
        process, log = procs.start(f"load-{key}-{n}", argv, pipes=True)
        loaders.append((process, log))
        first += count
    # The loaders stop themselves after --timeout; this is the backstop if one hangs.
    def kill_loaders() -> None:
        for process, _ in loaders:
            process.kill()

    watchdog = threading.Timer(opts.timeout + 60, kill_loaders)
    watchdog.daemon = True
    watchdog.start()
    for process, log in loaders:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise SystemExit(f"load generator for {name} failed:\n{log_tail(log)}")
    for process, _ in loaders:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    results: list[dict[str, Any]] = []
    for process, log in loaders:
        assert process.stdout is not None
        line = process.stdout.readline()
        process.wait(30)
        if not line:
            raise SystemExit(f"load generator for {name} died:\n{log_tail(log)}")
        results.append(json.loads(line))
    watchdog.cancel()
    rss = status_kib(watched_pid, "VmHWM") if watched_pid is not None else None
    cpu_after = cpu_seconds(watched_pid) if watched_pid is not None else None
    started = min(r["started"] for r in results if r["started"]) if any(
        r["started"] for r in results) else 0.0
    finished = max(r["finished"] for r in results)
    return PathResult(
        path=name,
        messages=opts.messages,
        seconds=max(0.0, finished - started),
        ok=sum(r["ok"] for r in results),
        ok_candidate=sum(r["ok_candidate"] for r in results),
        errors=sum(r["errors"] for r in results),
        latencies_ms=[x for r in results for x in r["latencies_ms"]],
        rss_kib=rss,
        cpu_s=cpu_after - cpu_before if cpu_after is not None and cpu_before is not None
        else None,
        error_samples=[s for r in results for s in r["error_samples"]],
    )


def start_sink(procs: Processes) -> tuple[str, int]:
    port = free_port()
    smtp_sink = shutil.which("smtp-sink")
    if smtp_sink:
        argv = [smtp_sink, "-h", "sink.bench.test", "-m", "1024"]
        if os.geteuid() == 0:
            # As root smtp-sink must drop privileges; postfix's package adds the user.
            argv += ["-u", "postfix" if _user_exists("postfix") else "nobody"]
        argv += [f"{HOST}:{port}", "1024"]
        kind = "smtp-sink"
    else:
        argv = this_script("_sink", port)
        kind = "aiosmtpd sink"
    process, log = procs.start("sink", argv)
    wait_for_port(port, process, log)
    return kind, port


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def start_py_spy(procs: Processes, output: Path, pid: int) -> subprocess.Popen[Any]:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--py-spy needs py-spy on the PATH (pip install py-spy)")
    fmt = "speedscope" if output.suffix == ".json" else (
        "raw" if output.suffix in (".txt", ".folded") else "flamegraph")
    process, _ = procs.start("py-spy", [
        py_spy, "record", "--pid", str(pid), "--rate", "250", "--gil",
        "--format", fmt, "--output", str(output.resolve())])
    time.sleep(1.0)  # let it attach before the load starts
    return process


def write_relay_config(workdir: Path, port: int, sink_port: int) -> Path:
    config = workdir / "atsmail.toml"
    config.write_text(
        "[storage]\n"
        'url = "sqlite+aiosqlite:///atsmail.db"\n'
        "\n[relay]\n"
        f'listen = "{HOST}:{port}"\n'
        f'upstream = "smtp://{HOST}:{sink_port}"\n'
        'allowed_networks = ["127.0.0.0/8"]\n'
        'hostname = "relay.bench.test"\n'
        "shutdown_grace = 10\n"
        "\n[api]\nenabled = false\n",
        encoding="utf-8",
    )
    return config


def relay_with_store(procs: Processes, workdir: Path, candidates: int) -> tuple[str, int, Path]:
    """A sink, and a relay configuration for a free port that relays to it,
    its store made and seeded: (the sink's kind, the relay's port, the config)."""
    sink_kind, sink_port = start_sink(procs)
    port = free_port()
    config = write_relay_config(workdir, port, sink_port)
    subprocess.run([sys.executable, "-m", "atsmail", "--config", str(config), "init"],
                   check=True, cwd=workdir, stdout=subprocess.DEVNULL)
    seed_store(config, candidates)
    return sink_kind, port, config


def seed_store(config_path: Path, candidates: int) -> None:
    from atsmail.config import load_config
    from atsmail.storage import Store

    async def main() -> None:
        store = Store.open(load_config(config_path).storage.url)
        try:
            await store.add_team_member(RECRUITER, "Robin Recruiter", "recruiter")
            await store.add_domain(INTERNAL_DOMAIN)
            await store.add_job(JOB_ID, "Benchmark engineer")
            for n in range(candidates):
                await store.add_candidate(f"c{n:06d}", f"Candidate {n}",
                                          [candidate_address(n)], [JOB_ID])
        finally:
            await store.close()

    asyncio.run(main())


def captured_count(config_path: Path) -> tuple[int, int]:
    """(confirmed captured messages, threads) in the relay's store."""
    from atsmail.config import load_config
    from atsmail.storage import Store

    async def main() -> tuple[int, int]:
        store = Store.open(load_config(config_path).storage.url)
        try:
            threads = await store.threads()
        finally:
            await store.close()
        return sum(t.message_count for t in threads), len(threads)

    return asyncio.run(main())


def print_table(rows: list[PathResult]) -> None:
    header = ["path", "messages", "seconds", "msg/s", "p50 ms", "p99 ms", "errors",
              "peak RSS MiB", "CPU s"]
    cells = [header]
    for row in rows:
        cells.append([
            row.path, str(row.messages), f"{row.seconds:.2f}", f"{row.rate:.0f}",
            f"{row.percentile(50):.1f}", f"{row.percentile(99):.1f}", str(row.errors),
            f"{row.rss_kib / 1024:.1f}" if row.rss_kib is not None else "-",
            f"{row.cpu_s:.1f}" if row.cpu_s is not None else "-",
        ])
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for n, line in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark client→sink, client→bare proxy→sink and "
                    "client→atsmail relay→sink on loopback.")
    parser.add_argument("--messages", type=int, default=2000, help="messages per path")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions")
    parser.add_argument("--size", type=int, default=10_240, help="approximate message bytes")
    parser.add_argument("--attachment", action="store_true",
                        help="a base64 attachment makes up each message, not plain text")
    parser.add_argument("--candidates", type=int, default=1000,
                        help="candidates seeded into the relay's store")
    parser.add_argument("--per-connection", type=int, default=10,
                        help="messages sent over one connection before reconnecting")
    parser.add_argument("--load-procs", type=int, default=1,
                        help="load generator processes (sessions are split among them)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds allowed for each path's load")
    parser.add_argument("--py-spy", type=Path, metavar="FILE",
                        help="record the relay under load with py-spy (optional): "
                             "FILE.svg flame graph, FILE.txt folded stacks, FILE.json speedscope")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (config, store, logs)")
    opts = parser.parse_args(argv)
    for name in ("messages", "sessions", "size", "candidates", "per_connection", "load_procs"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if opts.load_procs > opts.sessions:
        parser.error("--load-procs cannot exceed --sessions")
    if opts.timeout <= 0:
        parser.error("--timeout must be positive")
    return opts


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="atsmail-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def run_benchmark(opts: argparse.Namespace) -> int:
    with workspace(opts.keep) as workdir:
        procs = Processes(workdir)
        try:
            return _run_benchmark(opts, workdir, procs)
        finally:
            procs.stop_all()


def _run_benchmark(opts: argparse.Namespace, workdir: Path, procs: Processes) -> int:
    sink_kind, sink_port = start_sink(procs)
    print(f"sink: {sink_kind} on {HOST}:{sink_port}; {opts.messages} messages of ~{opts.size} "
          f"bytes over {opts.sessions} sessions, {opts.per_connection} per connection, "
          f"{opts.load_procs} load process(es)", flush=True)

    # The relay's store is prepared first, so seeding does not overlap a measurement.
    relay_port = free_port()
    config = write_relay_config(workdir, relay_port, sink_port)
    atsmail = [sys.executable, "-m", "atsmail", "--config", str(config)]
    subprocess.run([*atsmail, "init"], check=True, cwd=workdir, stdout=subprocess.DEVNULL)
    began = time.monotonic()
    seed_store(config, opts.candidates)
    print(f"store seeded with {opts.candidates} candidates in "
          f"{time.monotonic() - began:.1f} s", flush=True)

    rows = [drive(procs, "direct", "direct → sink", sink_port, opts, None)]

    proxy_port = free_port()
    proxy, proxy_log = procs.start("proxy", this_script("_proxy", proxy_port, sink_port))
    wait_for_port(proxy_port, proxy, proxy_log)
    rows.append(drive(procs, "proxy", "bare proxy → sink", proxy_port, opts, proxy.pid))
    stop_process(proxy)

    relay, relay_log = procs.start("relay", [*atsmail, "serve"])
    wait_for_port(relay_port, relay, relay_log)
    spy = start_py_spy(procs, opts.py_spy, relay.pid) if opts.py_spy else None
    rows.append(drive(procs, "relay", "atsmail relay → sink", relay_port, opts, relay.pid))
    if spy is not None:
        # py-spy writes its profile when SIGINT ends the recording.
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        print(f"relay profile written to {opts.py_spy}", flush=True)
    stop_process(relay)
    if relay.returncode != 0:
        print(f"warning: the relay exited with {relay.returncode}", file=sys.stderr)

    print()
    print_table(rows)
    bare, gateway = rows[1], rows[2]
    ratio = gateway.rate / bare.rate if bare.rate else 0.0
    print(f"\nrelay / bare proxy: {ratio:.0%} (target ≥ 70%)")

    captured, threads = captured_count(config)
    expected = gateway.ok_candidate
    verdict = "ok" if captured == expected else "MISMATCH"
    print(f"captured by the relay: {captured} messages in {threads} threads; expected "
          f"{expected} (candidate messages it accepted) — {verdict}")

    failed = False
    for row in rows:
        if row.errors:
            failed = True
            print(f"{row.path}: {row.errors} errors, e.g. {row.error_samples[:3]}",
                  file=sys.stderr)
    if failed or captured != expected:
        if not opts.keep:
            print(f"relay log (tail):\n{log_tail(relay_log)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "_sink":
        run_aiosmtpd_sink(int(argv[1]))
        return 0
    if argv and argv[0] == "_proxy":
        run_bare_proxy(int(argv[1]), int(argv[2]), shared=argv[3:] == ["shared"])
        return 0
    if argv and argv[0] == "_load":
        run_load_process(argv[1:])
        return 0
    return run_benchmark(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
