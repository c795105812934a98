"""Peak memory of the relay for one big message, and the cost of idle sessions.

Why: an IT admin sizes the gateway's machine by what one large message and
many open connections cost. Issue 5 sets the goals: a 30 MB message through
the relay keeps peak RSS under 3x the message's size above idle, and 100
idle sessions cost under 50 MB.

How: `atsmail serve` (relay only, SQLite store, one candidate) relays to a
sink (`smtp-sink` when on the PATH, else an aiosmtpd sink), all on loopback.
The script measures the relay process from /proc:

- idle: VmRSS once it has settled;
- one `--size` message captured (recruiter → candidate, a text part and a
  base64 attachment, as a CV arrives), then one passed through untouched
  (internal mail): for each, the peak RSS (VmHWM, reset before each message
  through /proc/PID/clear_refs) above idle, and that as a multiple of the
  message's size;
- `--sessions` connections opened, greeted with EHLO and left idle: VmRSS
  above what it was before.

It prints a table and exits 1 when a message was not answered 250 or a goal
is missed (`--no-check` only prints).
"""

from __future__ import annotations

import argparse
import smtplib
import socket
import sys
import time
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay import (  # this folder is not a package
    HOST,
    INTERNAL_DOMAIN,
    RECRUITER,
    Processes,
    candidate_address,
    relay_with_store,
    status_kib,
    wait_for_port,
    workspace,
)

MIB = 1024 * 1024
MESSAGE_GOAL = 3.0
SESSIONS_GOAL_MIB = 50.0


def gateway_kib(pid: int, field: str) -> int:
    kib = status_kib(pid, field)
    if kib is None:
        raise SystemExit(f"the gateway (process {pid}) is gone")
    return kib


def settled_rss_kib(pid: int, seconds: float = 1.5) -> int:
    """VmRSS once it has stopped moving (the lowest of a few readings)."""
    readings = []
    for _ in range(int(seconds / 0.25)):
        readings.append(gateway_kib(pid, "VmRSS"))
        time.sleep(0.25)
    return min(readings)


def reset_peak(pid: int) -> None:
    # "5" resets VmHWM to the current RSS (Linux 4.0 and later, man 5 proc).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def big_message(sender: str, recipient: str, size: int, subject: str) -> bytes:
    """A message of about `size` bytes: a short text and a base64 attachment."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '.')}.{time.time_ns()}@bench.test>"
    message.set_content("Please find my CV attached.\n")
    # base64 grows by 4/3 and its line ends by 78/76.
    payload = (b"%PDF-1.4 " * (size // 9))[: size * 3 // 4 * 76 // 78]
    message.add_attachment(payload, maintype="application", subtype="pdf",
                           filename="cv.pdf")
    return message.as_bytes(policy=SMTP)


def send(port: int, sender: str, recipient: str, raw: bytes) -> None:
    with smtplib.SMTP(HOST, port, timeout=300) as client:
        client.ehlo("bench.test")
        refused = client.sendmail(sender, [recipient], raw)
        if refused:
            raise SystemExit(f"refused: {refused}")


def idle_sessions(port: int, count: int) -> list[socket.socket]:
    opened = []
    for _ in range(count):
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.recv(1024)  # the greeting
        sock.sendall(b"EHLO idle.bench.test\r\n")
        reply = b""
        while not reply.endswith(b"\r\n") or reply.splitlines()[-1][3:4] != b" ":
            reply += sock.recv(4096)
        opened.append(sock)
    return opened


def run(opts: argparse.Namespace) -> int:
    with workspace(opts.keep) as workdir:
        procs = Processes(workdir)
        try:
            _, relay_port, config = relay_with_store(procs, workdir, 1)
            atsmail = [sys.executable, "-m", "atsmail", "--config", str(config)]
            gateway, log = procs.start("gateway", [*atsmail, "serve"])
            wait_for_port(relay_port, gateway, log)
            # A small message first: everything a message uses is loaded.
            send(relay_port, RECRUITER, candidate_address(0),
                 big_message(RECRUITER, candidate_address(0), 10_000, "warm up"))
            idle = settled_rss_kib(gateway.pid)

            rows = []
            for what, sender, recipient in (
                    ("captured", RECRUITER, candidate_address(0)),
                    ("passed on", RECRUITER, f"colleague@{INTERNAL_DOMAIN}")):
                raw = big_message(sender, recipient, opts.size, f"{what} message")
                print(f"before the {what} message: {settled_rss_kib(gateway.pid) / 1024:.1f} MiB",
                      flush=True)
                reset_peak(gateway.pid)
                began = time.monotonic()
                send(relay_port, sender, recipient, raw)
                seconds = time.monotonic() - began
                peak = gateway_kib(gateway.pid, "VmHWM")
                above = (peak - idle) * 1024
                rows.append((f"{len(raw) / MIB:.1f} MiB message, {what}",
                             f"{above / MIB:.1f} MiB", f"{above / len(raw):.2f}x",
                             f"< {MESSAGE_GOAL:.0f}x", f"{seconds:.2f} s",
                             above / len(raw) < MESSAGE_GOAL))
                del raw

            before = settled_rss_kib(gateway.pid)
            sockets = idle_sessions(relay_port, opts.sessions)
            after = settled_rss_kib(gateway.pid)
            for sock in sockets:
                sock.close()
            cost = (after - before) / 1024
            rows.append((f"{opts.sessions} idle sessions", f"{cost:.1f} MiB",
                         f"{cost * 1024 / opts.sessions:.0f} KiB each",
                         f"< {SESSIONS_GOAL_MIB:.0f} MiB", "", cost < SESSIONS_GOAL_MIB))
        finally:
            procs.stop_all()

    print(f"relay idle RSS: {idle / 1024:.1f} MiB")
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    titles = ("", "peak above idle", "ratio", "goal", "time")
    print("  ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:5], widths, strict=True))
              + ("" if row[5] else "  MISSED"))
    return 0 if opts.no_check or all(row[5] for row in rows) else 1


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=30 * 1000 * 1000,
                        help="bytes in the big message (default 30 MB)")
    parser.add_argument("--sessions", type=int, default=100,
                        help="idle sessions to open (default 100)")
    parser.add_argument("--no-check", action="store_true",
                        help="print the figures, exit 0 even when a goal is missed")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
