"""Where a relayed message's time goes, inside one gateway process.

Why: the figures in the README's "Speed" section that explain the relay's
speed (the store's share of a captured message, CPU per message by thread,
the pause of a full garbage collection) need a script behind them. This one
runs the gateway as `serve` does (one process, the API off), instrumented,
in this process, on the same load as `bench/relay.py` (its load generator,
in a child process, and Postfix's `smtp-sink` or an aiosmtpd sink as the
upstream), and prints:

- the time of each step of a message's DATA, from its end of data to the
  answer (percentiles over all messages): reading the message, the rules
  with their candidate look-up, the pending copy's commit, all three
  together (which overlap the upstream transfer), the upstream's DATA, and
  the confirming commit;
- CPU milliseconds per message of each of the process's threads (the event
  loop's, the store's writer, reader and log folder), from /proc;
- the full garbage collections during the load: how many, and the longest
  pause. `serve` keeps what starting made out of those (`gc.freeze`);
  `--no-freeze` shows what they cost without that.

Every second message is candidate mail, as in `bench/relay.py`, and plain
text, or with `--attachment` mostly a base64 attachment. The store is
SQLite, seeded with `--candidates` candidates.

Usage:

    python bench/breakdown.py [--messages N] [--sessions M] [--size BYTES]
                              [--attachment] [--candidates K] [--no-freeze] [--keep]

A default run (2,000 messages of 10 KB, one session) takes about 15 s. The
pending copy and its confirmation are timed for candidate mail only; the
other steps for every message.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay import (  # this folder is not a package
    PathResult,
    Processes,
    captured_count,
    drive,
    relay_with_store,
    workspace,
)

# The steps timed, as (label, class, method); the classes are looked up late.
STEPS = [
    ("receive the data (before the steps below)", "atsmail.gateway.relay:RelayProtocol",
     "_read_data"),
    ("read the message", "atsmail.gateway.relay:Relay", "_read"),
    ("rules and look-up", "atsmail.gateway.relay:Relay", "_decide"),
    ("pending copy committed", "atsmail.storage.capture:CaptureWriter", "prepare"),
    ("all three (overlap the upstream)", "atsmail.gateway.relay:Relay", "_judge"),
    ("upstream DATA", "atsmail.gateway.upstream:SmtpSession", "data"),
    ("confirmation committed", "atsmail.gateway.relay:Relay", "_settle"),
    ("whole DATA", "atsmail.gateway.relay:Relay", "_relay_message"),
]


def time_steps() -> dict[str, list[float]]:
    """Wrap each step's coroutine method so that its durations (ms) are kept."""
    import importlib

    durations: dict[str, list[float]] = collections.defaultdict(list)
    for label, where, name in STEPS:
        module, _, cls_name = where.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        original = getattr(cls, name)

        @functools.wraps(original)
        async def timed(*args: Any, __original: Callable[..., Any] = original,
                        __label: str = label, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return await __original(*args, **kwargs)
            finally:
                durations[__label].append((time.perf_counter() - began) * 1000)

        setattr(cls, name, timed)
    return durations


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process, by name."""
    ticks = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name.rstrip("_0123456789") for t in threading.enumerate()}
    used: dict[str, float] = collections.defaultdict(float)
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended meanwhile
        used[names.get(int(task.name), "other")] += (int(fields[11]) + int(fields[12])) / ticks
    return used


class Collections:
    """The pauses of full (generation 2) garbage collections while watching."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._began = 0.0
        self.watching = False

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.watching or info.get("generation") != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses_ms.append((time.perf_counter() - self._began) * 1000)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def measure(opts: argparse.Namespace, procs: Processes, config: Path, port: int,
                  kind: str) -> int:
    from atsmail.config import load_config
    from atsmail.gateway.server import Gateway

    durations = time_steps()
    collections_seen = Collections()
    gc.callbacks.append(collections_seen)

    gateway = Gateway(load_config(config))
    await gateway.start(freeze=opts.freeze)
    try:
        cpu_before = thread_cpu()
        collections_seen.watching = True
        row: PathResult = await asyncio.to_thread(
            drive, procs, "breakdown", "relay", port, opts, None)
        collections_seen.watching = False
        cpu_after = thread_cpu()
    finally:
        await gateway.stop()

    kind_of_text = "with an attachment" if opts.attachment else "of plain text"
    print(f"one gateway process, {opts.messages} messages of ~{opts.size} bytes "
          f"{kind_of_text} over "
          f"{opts.sessions} session(s), half candidate mail, {opts.candidates} candidates, "
          f"upstream {kind}: {row.rate:.0f} messages/s, {row.errors} errors")
    print("\nstep (ms) | messages | p50 | p90 | p99")
    print("--- | --- | --- | --- | ---")
    for label, _, _ in STEPS:
        values = durations.get(label, [])
        if values:
            print(f"{label} | {len(values)} | {percentile(values, 50):.2f} | "
                  f"{percentile(values, 90):.2f} | {percentile(values, 99):.2f}")
    print("\nCPU ms per message, by thread:")
    for name in sorted(cpu_after, key=lambda n: -(cpu_after[n] - cpu_before.get(n, 0.0))):
        used = cpu_after[name] - cpu_before.get(name, 0.0)
        if used > 0:
            print(f"  {name}: {used * 1000 / max(1, row.ok):.2f}")
    pauses = collections_seen.pauses_ms
    frozen = f"{gc.get_freeze_count():,} startup objects frozen" if opts.freeze else "no freeze"
    print(f"\nfull garbage collections under load ({frozen}): {len(pauses)}"
          + (f", longest {max(pauses):.1f} ms, median {percentile(pauses, 50):.1f} ms"
             if pauses else ""))

    captured, _ = await asyncio.to_thread(captured_count, config)
    if row.errors or captured != row.ok_candidate:
        print(f"captured {captured}, expected {row.ok_candidate}; errors: "
              f"{row.error_samples[:3]}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--size", type=int, default=10_240, help="approximate message bytes")
    parser.add_argument("--attachment", action="store_true",
                        help="a base64 attachment makes up each message, not plain text")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--no-freeze", dest="freeze", action="store_false",
                        help="leave the startup objects to the garbage collector")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    opts = parser.parse_args(argv)
    # What bench/relay.py's load generator needs besides.
    opts.per_connection, opts.load_procs = 10, 1
    return opts


def main(argv: Sequence[str]) -> int:
    import uvloop

    opts = parse_args(argv)
    with workspace(opts.keep) as workdir:
        procs = Processes(workdir)
        try:
            kind, port, config = relay_with_store(procs, workdir, opts.candidates)
            return uvloop.run(measure(opts, procs, config, port, kind))
        finally:
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
