"""Pure, synchronous capture decisions over a parsed message and a context."""

from atsmail.rules.context import CandidateInfo, Context, KnownMessage
from atsmail.rules.engine import Decision, Rule, TraceEntry, Verdict, evaluate
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
    "read_message",
]


def decide(msg: MessageFacts, ctx: Context, stop_at_veto: bool = False) -> Decision:
    """Run the standard rule table."""
    return evaluate(msg, ctx, RULES, stop_at_veto)
