"""What the relay's DATA reader costs for each kind of text, in ms per MB.

Why: the reader runs on the event loop for every byte of every message, and
what a message's lines look like is up to whoever sends it. Its cost must
not depend on them: a reader that cut the data at each line ending in a dot
spent nearly 200 times the work of plain text on a message of lines "a.".

How: the relay's own reader (`RelayProtocol._read_data`) reads `--size`
bytes of each kind of text, stuffed and ended as a client sends them, from
an asyncio stream fed in 64 KB pieces before it starts (so no time goes to
waiting); best of `--runs` runs. No sockets: the figure is the reader's CPU
alone. The lines it would pass upstream as they arrive are found and their
line ends checked, as in the relay (a message not passed on whole has its
line ends checked at its end instead), but they are not written anywhere.

Usage:

    python bench/reader.py [--size BYTES] [--runs N]

A default run takes a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import types
from collections.abc import Sequence

from atsmail.gateway.relay import RelayProtocol, passable_lines

# Each kind of text, as one repeated run of lines.
KINDS = {
    "plain lines of 78 bytes": b"x" * 76 + b"\r\n",
    "prose: one line in five ends in a dot": (b"x" * 76 + b"\r\n") * 4 + b"x" * 75 + b".\r\n",
    "every line ends in a dot": b"x" * 75 + b".\r\n",
    "lines of just 'a.'": b"a.\r\n",
    "every line starts with a dot (stuffed)": b".." + b"x" * 74 + b"\r\n",
}
FEED = 64 * 1024


async def read_once(data: bytes) -> float:
    reader = asyncio.StreamReader(limit=1001)  # aiosmtpd's, as the relay has it
    for start in range(0, len(data), FEED):
        reader.feed_data(data[start:start + FEED])

    async def pass_nowhere(data: bytearray, passed: int, dotted: bool) -> int:
        lines = passable_lines(data, passed)
        return -1 if lines is None else passed + len(lines)

    protocol = types.SimpleNamespace(_reader=reader, data_size_limit=0, _pass_on=pass_nowhere)
    began = time.perf_counter()
    _, refusal = await RelayProtocol._read_data(protocol)  # type: ignore[arg-type]
    took = time.perf_counter() - began
    if refusal is not None:
        raise SystemExit(f"the reader refused the data: {refusal}")
    return took


async def main(size: int, runs: int) -> None:
    print(f"the relay's DATA reader, best of {runs} runs, ms per MB:")
    for name, lines in KINDS.items():
        data = lines * (size // len(lines)) + b".\r\n"
        best = min([await read_once(data) for _ in range(runs)])
        print(f"  {name}: {best * 1e3 * (1 << 20) / len(data):.2f}")


def run(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes of each kind of text")
    parser.add_argument("--runs", type=int, default=10)
    opts = parser.parse_args(argv)
    asyncio.run(main(opts.size, opts.runs))


if __name__ == "__main__":
    run()
