"""Pure, synchronous capture decisions over a parsed message and a context."""

from atsmail.rules.context import CandidateInfo, Context, KnownMessage
from atsmail.rules.engine import Decision, Rule, TraceEntry, Verdict, evaluate, evaluate_vetoes
from atsmail.rules.message import MessageFacts, read_message
from atsmail.rules.table import RULES

__all__ = [
    "RULES",
    "CandidateInfo",
    "Context",
    "Decision",
    "KnownMessage",
    "MessageFacts",
    "Rule",
    "TraceEntry",
    "Verdict",
    "decide",
    "evaluate",
    "evaluate_vetoes",
    "read_message",
    "vetoed",
]


def decide(msg: MessageFacts, ctx: Context) -> Decision:
    """Run the standard rule table."""
    return evaluate(msg, ctx, RULES)


def vetoed(msg: MessageFacts, ctx: Context) -> Decision | None:
    """The standard table's decision when a rule vetoes capture, else None."""
    return evaluate_vetoes(msg, ctx, RULES)
