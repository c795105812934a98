"""The atsmail relay beside a stock Postfix relay, both driven by Postfix's smtp-source.

Why: atsmail sits in the path of all company mail, so it must keep up with
the MTA beside it. This script runs, in one bounded run on loopback, the same
loads along these paths, each ending in Postfix's `smtp-sink`:

- smtp-source → smtp-sink (what the machine and the tools can do);
- smtp-source → Postfix (a private instance: `relayhost` the sink, its own
  queue, as in `bench/crash.py`) → smtp-sink;
- smtp-source → a bare aiosmtpd→aiosmtplib proxy, N processes (`bench/relay.py`'s:
  no store, no rules, nothing captured) → smtp-sink: what any before-queue
  proxy on atsmail's stack does at best;
- smtp-source → `atsmail serve --workers N` (capture on: every message is
  candidate mail, or with `--recipient outside` mail from a recruiter to
  someone outside who is no candidate) → smtp-sink;
- with `--behind-postfix`, also smtp-source → a second Postfix whose
  `relayhost` is atsmail → atsmail → smtp-sink: the company MTA with
  atsmail put behind it, as deployed, against the same MTA straight to the
  sink (Postfix (delivered)).

For each message size (`--sizes`) and number of concurrent sessions
(`--sessions`) it prints messages per second as smtp-source saw them (for
Postfix: accepted into its queue, and delivered to the sink, which it does
after answering) and the ratio of atsmail to Postfix. The store holds
`--candidates` candidates (1,000,000 is seeded in bulk in about a minute).

A latency line follows: one session sending `--latency-messages` 10 KB
messages, timed from MAIL FROM to the 250 after DATA by `bench/relay.py`'s
load generator, straight to the sink, into Postfix (which answers once the
message is in its queue, fsynced) and through atsmail (which answers once the
sink has answered and the capture is committed, fsynced twice); the
difference of the 99th percentiles is what each adds.

Needs Postfix (Debian package `postfix`, whose master starts as root).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from crash import Postfix  # this folder is not a package
from relay import (
    HOST,
    JOB_ID,
    RECRUITER,
    LoadResult,
    Processes,
    candidate_address,
    captured_count,
    free_port,
    run_load,
    seed_store,
    start_sink,
    stop_process,
    this_script,
    wait_for_port,
    workspace,
    write_relay_config,
)

SEED_CHUNK = 20_000
# Outside the company, and no candidate: the rules look the address up and
# pass the message on uncaptured.
OUTSIDE = "someone@elsewhere.test"


def seed_many(config: Path, candidates: int) -> None:
    """The recruiter, domain and job, then `candidates` candidates in bulk inserts."""
    from sqlalchemy import Connection, insert

    from atsmail.config import load_config
    from atsmail.storage import Store
    from atsmail.storage.models import Candidate, CandidateEmail, CandidateJob

    seed_store(config, 0)

    async def main() -> None:
        store = Store.open(load_config(config).storage.url)
        try:
            for start in range(0, candidates, SEED_CHUNK):
                numbers = range(start, min(candidates, start + SEED_CHUNK))

                def write(conn: Connection, numbers: range = numbers) -> None:
                    ids = [f"c{n:07d}" for n in numbers]
                    conn.execute(insert(Candidate),
                                 [{"id": i, "name": f"Candidate {i}"} for i in ids])
                    conn.execute(insert(CandidateEmail), [
                        {"candidate_id": i, "email": candidate_address(n)}
                        for i, n in zip(ids, numbers, strict=True)])
                    conn.execute(insert(CandidateJob),
                                 [{"candidate_id": i, "job_id": JOB_ID} for i in ids])

                await store.db.run(write, write=True)
        finally:
            await store.close()

    asyncio.run(main())


def smtp_source(port: int, sessions: int, messages: int, size: int, to: str) -> float:
    """Seconds smtp-source takes to send `messages` messages; fails on its errors."""
    began = time.monotonic()
    subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                    "-f", RECRUITER, "-t", to, "-M", "load.bench.test", f"{HOST}:{port}"],
                   check=True, timeout=600, stdout=subprocess.DEVNULL)
    return time.monotonic() - began


def delivered_rate(postfix: Postfix, port: int, sessions: int, count: int, size: int,
                   to: str) -> tuple[float, float]:
    """Messages/s into `postfix` as smtp-source saw them, and as it delivered them."""
    start = time.monotonic()
    accepted = count / smtp_source(port, sessions, count, size, to)
    drained(postfix)
    return accepted, count / (time.monotonic() - start)


def drained(postfix: Postfix, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while postfix.queued():
        if time.monotonic() > deadline:
            raise SystemExit("Postfix did not deliver its queue in time")
        time.sleep(0.02)


def latency(port: int, messages: int, candidates: int, tag: str) -> LoadResult:
    result = LoadResult()
    asyncio.run(run_load(result, port, 0, messages, 1, 10_240, candidates, 100, tag))
    if result.errors:
        raise SystemExit(f"latency run failed: {result.error_samples}")
    return result


def percentile(result: LoadResult, q: float) -> float:
    ordered = sorted(result.latencies_ms)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def p99(result: LoadResult) -> float:
    return percentile(result, 0.99)


def print_latency(sink_port: int, mta_port: int, relay_port: int,
                  opts: argparse.Namespace) -> None:
    straight = latency(sink_port, opts.latency_messages, opts.candidates, "direct")
    queued = latency(mta_port, opts.latency_messages, opts.candidates, "postfix")
    relayed = latency(relay_port, opts.latency_messages, opts.candidates, "relay")
    print("\nlatency, one session, 10 KB, ms (p50 / p90 / p99 / max):")
    for name, load in (("straight to the sink", straight),
                       ("through Postfix, to its queue", queued),
                       ("through atsmail, to the sink, captured", relayed)):
        print(f"  {name}: " + " / ".join(
            f"{percentile(load, q):.1f}" for q in (0.5, 0.9, 0.99, 1.0)))
    print(f"added at p99: Postfix {p99(queued) - p99(straight):+.1f} ms, "
          f"atsmail {p99(relayed) - p99(straight):+.1f} ms")


def run(opts: argparse.Namespace) -> int:
    if os.geteuid() != 0 or not shutil.which("postfix") or not shutil.which("smtp-source"):
        raise SystemExit("needs root, Postfix and its smtp-source (Debian package postfix)")
    # A SIGTERM (a timeout, say) still stops Postfix and the rest on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    with workspace(opts.keep) as workdir:
        procs = Processes(workdir)
        postfix: Postfix | None = None
        behind: Postfix | None = None
        try:
            _, sink_port = start_sink(procs)
            relay_port, mta_port = free_port(), free_port()
            config = write_relay_config(workdir, relay_port, sink_port)
            atsmail = [sys.executable, "-m", "atsmail", "--config", str(config)]
            subprocess.run([*atsmail, "init"], check=True, cwd=workdir,
                           stdout=subprocess.DEVNULL)
            began = time.monotonic()
            seed_many(config, opts.candidates)
            print(f"store seeded with {opts.candidates:,} candidates in "
                  f"{time.monotonic() - began:.0f} s", flush=True)
            gateway, log = procs.start("gateway", [*atsmail, "serve", "--workers",
                                                   str(opts.workers)])
            wait_for_port(relay_port, gateway, log)
            proxy_port = free_port()
            for n in range(opts.workers):
                proxy, proxy_log = procs.start(f"proxy-{n}", this_script(
                    "_proxy", proxy_port, sink_port, "shared"))
                wait_for_port(proxy_port, proxy, proxy_log)
            postfix = Postfix(workdir / "postfix", mta_port, sink_port)
            postfix.start(procs)
            if opts.behind_postfix:
                behind_port = free_port()
                behind = Postfix(workdir / "postfix-behind", behind_port, relay_port)
                behind.start(procs)
            time.sleep(2)  # let the relay workers start too

            candidate = opts.recipient == "candidate"
            to = candidate_address(opts.candidates - 1) if candidate else OUTSIDE
            kind = ("every message candidate mail" if candidate else "every message to "
                    "someone outside who is no candidate (looked up, not captured)")
            print(f"\natsmail serve --workers {opts.workers}; {kind}; "
                  f"messages/s as smtp-source saw them\n")
            header = ("size", "sessions", "messages", "sink", "Postfix accepted",
                      "Postfix delivered", "bare proxy", "bare proxy / Postfix", "atsmail",
                      "atsmail / Postfix")
            if behind is not None:
                header += ("Postfix → atsmail delivered", "its / Postfix delivered")
            print(" | ".join(header))
            print(" | ".join("---" for _ in header))
            sent = 0
            for size in opts.sizes:
                for sessions in opts.sessions:
                    count = max(sessions, opts.bytes // size)
                    direct = count / smtp_source(sink_port, sessions, count, size, to)
                    accepted, delivered = delivered_rate(postfix, mta_port, sessions, count,
                                                         size, to)
                    bare = count / smtp_source(proxy_port, sessions, count, size, to)
                    relayed = count / smtp_source(relay_port, sessions, count, size, to)
                    sent += count
                    row = (f"{size:,} | {sessions} | {count} | {direct:,.0f} | {accepted:,.0f} | "
                           f"{delivered:,.0f} | {bare:,.0f} | {bare / delivered:.2f} | "
                           f"{relayed:,.0f} | {relayed / delivered:.2f}")
                    if behind is not None:
                        _, chained = delivered_rate(behind, behind_port, sessions, count,
                                                    size, to)
                        sent += count
                        row += f" | {chained:,.0f} | {chained / delivered:.2f}"
                    print(row, flush=True)

            if opts.latency_messages:
                print_latency(sink_port, mta_port, relay_port, opts)
            stop_process(gateway)
            captured, _ = captured_count(config)
            expected = (sent if candidate else 0) + opts.latency_messages // 2
            print(f"captured {captured} messages; expected {expected}")
            return 0 if captured == expected else 1
        finally:
            for instance in (postfix, behind):
                if instance is not None:
                    instance.stop()
            procs.stop_all()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")],
                        default=[10_240, 1_048_576], help="message sizes in bytes")
    parser.add_argument("--sessions", type=lambda v: [int(x) for x in v.split(",")],
                        default=[1, 20, 100], help="concurrent sessions")
    parser.add_argument("--bytes", type=int, default=40 * 1024 * 1024,
                        help="bytes to send per cell (messages = bytes / size)")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--recipient", choices=("candidate", "outside"), default="candidate",
                        help="whom the recruiter's messages go to: a candidate (captured), or "
                             "someone outside who is no candidate (looked up, passed on)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--latency-messages", type=int, default=500,
                        help="messages in the latency run (0: no latency run)")
    parser.add_argument("--behind-postfix", action="store_true",
                        help="also time a second Postfix relaying through atsmail")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args(sys.argv[1:])))
