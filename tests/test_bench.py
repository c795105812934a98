"""The benchmarks run end to end (their figures are for the README, not asserted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_peer

ROOT = Path(__file__).resolve().parent.parent


def test_the_memory_bench_relays_both_messages_and_prints_its_table() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--size", "3000000",
         "--sessions", "10", "--no-check"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any("MiB message, captured" in line for line in lines)
    assert any("MiB message, passed on" in line for line in lines)
    assert any(line.startswith("10 idle sessions") for line in lines)


@pytest.mark.parametrize("kind", [[], ["--attachment"]], ids=["plain text", "attachment"])
def test_the_breakdown_bench_times_each_step_and_thread(kind: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "breakdown.py"), "--messages", "100", *kind],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "100 messages" in out and ", 0 errors" in out
    assert ("with an attachment" in out) == bool(kind)
    for step in ("read the message", "pending copy committed", "upstream DATA",
                 "confirmation committed", "whole DATA"):
        assert f"\n{step} | " in out, out
    assert "MainThread:" in out and "atsmail-store-writer:" in out
    assert "full garbage collections under load" in out


def test_the_reader_bench_reads_every_kind_of_text() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reader.py"), "--size", "100000", "--runs", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(done.stdout.splitlines()) == 6 and "lines of just 'a.': " in done.stdout


def test_the_postfix_comparison_runs_every_path_and_captures_every_message() -> None:
    require_peer(os.geteuid() == 0 and bool(shutil.which("postfix"))
                 and bool(shutil.which("smtp-source")),
                 "the comparison needs root, Postfix and smtp-source (Debian's postfix)")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--sizes", "10240",
         "--sessions", "2", "--bytes", "204800", "--latency-messages", "20", "--workers", "1",
         "--behind-postfix"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("10,240 |")]
    assert len(rows) == 1 and len(rows[0]) == 12, done.stdout
    assert "added at p99" in done.stdout
    # Every message of every path through atsmail, captured once.
    assert "captured 50 messages; expected 50" in done.stdout, done.stdout
