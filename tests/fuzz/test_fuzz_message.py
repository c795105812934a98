"""The fuzz harness itself: every message in tests/data goes through it whole.

So the harness keeps working between fuzzing runs, and the corpus it is
seeded with is known to pass (atheris is not needed for this).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.fuzz_message import check

DATA = Path(__file__).parent.parent / "data"


@pytest.mark.parametrize("path", sorted(DATA.rglob("*.eml")), ids=lambda p: p.name)
def test_the_seed_corpus_passes_the_harness(path: Path) -> None:
    check(path.read_bytes())
