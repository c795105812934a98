"""Coverage-guided fuzzing of what the gateway does with a message's bytes.

The relay, the mirror, the sender and `atsmail explain` all hand raw bytes
to `read_message` and the facts to the rules. `read_message` documents no
exception at all (a malformed message must still be relayed and judged), nor
do the rules or the mirror's prefilter, so any exception here is a crash.

    pip install atheris
    python tests/fuzz/fuzz_message.py CORPUS_DIR -max_total_time=60

Seed CORPUS_DIR with the messages in tests/data (`.ci/run` does).
"""

from __future__ import annotations

import sys

from atsmail.rules import CandidateInfo, Context, KnownMessage, decide, read_message, vetoed
from atsmail.rules.prefilter import never_captured

# A store's worth of context, so that every rule has something to compare.
CONTEXT = Context(
    internal_domains=frozenset({"example.com"}),
    team=frozenset({"recruiter@example.com"}),
    candidates={
        "C-1": CandidateInfo("C-1", "Ada Applicant", frozenset({"ada@applicant.test"}),
                             (("J1", False),)),
        "C-2": CandidateInfo("C-2", "Grace Hopper", frozenset({"grace@candidates.test"}),
                             (("J2", True),)),
    },
    known_messages={"first@example.com": KnownMessage("first@example.com", 1,
                                                      frozenset({"C-1"}))},
    ats_inbox="ats@example.com",
)


def check(data: bytes) -> None:
    """One input, judged as the relay judges it; raises on a crash."""
    facts = read_message(data, "sender@outside.test", ["ada@applicant.test", "jobs@example.com"])
    # The lazily read parts: the body, for a forward, and what depends on it.
    facts.forward  # noqa: B018
    _ = (facts.participants, facts.thread_ids, facts.capture_key, facts.forwards,
         facts.is_reply)
    decide(facts, CONTEXT)
    vetoed(facts, CONTEXT)
    never_captured(data, CONTEXT)


def main() -> None:
    import atheris  # only the fuzzing run needs it

    atheris.instrument_all()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
