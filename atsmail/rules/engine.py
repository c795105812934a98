"""The rule engine: one ordered table of pure rules, walked in full.

Every rule runs for every message, hit or miss, so the trace always tells
the whole story (`atsmail explain`, the audit of each captured message).
The engine then folds the verdicts into one `Decision`; it is the only
place where verdicts are combined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from atsmail.rules.context import Context
from atsmail.rules.message import MessageFacts

Direction = Literal["inbound", "outbound"]


@dataclass(frozen=True)
class Verdict:
    """What one rule found. `hit` says whether the rule applied."""

    hit: bool
    reasons: tuple[str, ...] = ()
    # Candidates this rule ties the message to.
    candidates: frozenset[str] = frozenset()
    # Candidates this rule says must not be captured for.
    excluded: frozenset[str] = frozenset()
    # Forbids capture whatever the other rules found (a bulk mail hit, or
    # a team-scope miss).
    veto: bool = False
    direction: Direction | None = None
    # The captured thread the message continues.
    thread_id: int | None = None
    # The message must start a thread of its own (a forward).
    new_thread: bool = False
    # (address, name) of a new candidate to create from this message.
    intake: tuple[str, str] | None = None


class Rule(Protocol):
    name: str
    description: str
    # Whether its verdict may veto: a walk that only asks whether a message
    # is vetoed stops after the last rule that may.
    can_veto: bool

    def check(self, msg: MessageFacts, ctx: Context) -> Verdict: ...


@dataclass(frozen=True)
class TraceEntry:
    rule: str
    verdict: Literal["hit", "miss"]
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"rule": self.rule, "verdict": self.verdict, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class Decision:
    capture: bool
    direction: Direction
    candidates: tuple[str, ...]
    # The existing thread to file into; None with capture means a new thread.
    thread_id: int | None
    trace: tuple[TraceEntry, ...] = field(default=())
    # The rules that settled the outcome: those that vetoed it, else the hits.
    deciding_rules: tuple[str, ...] = ()
    vetoed: bool = False
    # A candidate to create before the message can be captured on them.
    intake: tuple[str, str] | None = None

    @property
    def thread(self) -> Literal["new", "existing"] | None:
        if not self.capture:
            return None
        return "existing" if self.thread_id is not None else "new"


def evaluate(msg: MessageFacts, ctx: Context, rules: Sequence[Rule],
             stop_at_veto: bool = False) -> Decision:
    """Run `rules` in order. With `stop_at_veto` the walk ends at the first
    veto and the trace is partial."""
    trace: list[TraceEntry] = []
    candidates: dict[str, None] = {}
    excluded: set[str] = set()
    vetoes: list[str] = []
    direction: Direction = "inbound"
    thread_id: int | None = None
    new_thread = False
    intake: tuple[str, str] | None = None

    for rule in rules:
        verdict = rule.check(msg, ctx)
        trace.append(TraceEntry(rule.name, "hit" if verdict.hit else "miss", verdict.reasons))
        if verdict.veto:
            if not rule.can_veto:
                raise TypeError(f"rule {rule.name} vetoed but does not declare can_veto")
            vetoes.append(rule.name)
            if stop_at_veto:
                break
        if not verdict.hit:
            continue
        direction = verdict.direction or direction
        for candidate in sorted(verdict.candidates):
            candidates.setdefault(candidate, None)
        excluded |= verdict.excluded
        intake = intake or verdict.intake
        if verdict.new_thread:
            new_thread = True
        elif verdict.thread_id is not None and thread_id is None:
            thread_id = verdict.thread_id

    kept = tuple(c for c in candidates if c not in excluded)
    capture = bool(kept) and not vetoes
    return Decision(
        capture=capture,
        direction=direction,
        candidates=kept if capture else (),
        thread_id=None if new_thread or not capture else thread_id,
        trace=tuple(trace),
        deciding_rules=tuple(vetoes) or tuple(t.rule for t in trace if t.verdict == "hit"),
        vetoed=bool(vetoes),
        intake=None if vetoes else intake,
    )


def evaluate_vetoes(msg: MessageFacts, ctx: Context, rules: Sequence[Rule]) -> Decision | None:
    """The decision when a rule vetoes capture (its trace ends at that veto),
    else None. Walks only as far as the last rule that can veto: for callers
    that judge the message in full, with a fuller context, when it is not."""
    last = max((i for i, rule in enumerate(rules) if rule.can_veto), default=-1)
    decision = evaluate(msg, ctx, rules[:last + 1], stop_at_veto=True)
    return decision if decision.vetoed else None
