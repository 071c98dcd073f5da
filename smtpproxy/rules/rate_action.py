"""The ``ratelimit`` rule action: a GCRA limit keyed on message facts, checked when the rule matches.

::

    then: {ratelimit: {key: [mail_from.domain, client.ip], rate: 100/hour, burst: 20}}

The key is built from rule fields (see :mod:`smtpproxy.rules.fields`): the
values of each field, lower-cased, joined with ``|`` (several values of one
field, e.g. every recipient at stage data, joined with ``,``). At stage rcpt
``rcpt``/``rcpt.local``/``rcpt.domain`` are the recipient being checked, so a
recipient-keyed limit counts each recipient on its own. The limit itself is
applied by :class:`smtpproxy.rules.check.RulesCheck` through the App's
:class:`smtpproxy.ratelimit.limiter.RateLimiter` (``hit``), scoped by the rule
name: the same key in two rules is two buckets.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from smtpproxy.ratelimit.gcra import Rate
from smtpproxy.rules.fields import FIELDS, STAGE_ORDER, EvalContext, FieldSpec, lookup
from smtpproxy.rules.loader import describe
from smtpproxy.stages import Stage
from smtpproxy.verdict import Reply

RATELIMIT_KEYS = ("key", "rate", "burst", "reply")
MAX_KEY_FIELDS = 8  # a key of more facts than this is a mistake, not a policy
_EARLY = (Stage.CONNECT, Stage.HELO)


def default_reply(stage: Stage, rule: str) -> tuple[int, str, str]:
    """(code, enhanced, text) of a refusal: 421 4.7.0 (and close) before MAIL, else 450 4.7.1."""
    text = f"Rate limit {rule} exceeded, try again later"
    return (421, "4.7.0", text) if stage in _EARLY else (450, "4.7.1", text)


@dataclass(frozen=True, slots=True)
class RateLimitAction:
    """A compiled ``ratelimit`` action: which facts make the key, the rate, the burst, the refusal."""

    fields: tuple[FieldSpec, ...]
    rate: Rate
    burst: int
    reply: Reply

    def key(self, ctx: EvalContext) -> str:
        """The bucket key of this evaluation: field values joined with ``|``."""
        return "|".join(",".join(_escape(v) for v in ctx.lowered(spec)) for spec in self.fields)


def _escape(value: str) -> str:
    # Separators inside a value are escaped so that ("a|b", "c") and ("a", "b|c") differ.
    return value.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,")


def key_fields(node: object, stage: Stage) -> tuple[tuple[FieldSpec, ...], list[str]]:
    """The fields of a ``key:`` (one name or a list) and the problems found, for a rule at ``stage``."""
    names = node if isinstance(node, list) else [node]
    if not names or not all(isinstance(n, str) and n for n in names):
        return (), [
            f"ratelimit: key: expected a field or a list of fields like [mail_from.domain, client.ip], got {describe(node)}"
        ]
    if len(names) > MAX_KEY_FIELDS:
        return (), [f"ratelimit: key: expected at most {MAX_KEY_FIELDS} fields, got {len(names)}"]
    specs: list[FieldSpec] = []
    problems: list[str] = []
    for name in names:
        spec = lookup(str(name))
        if spec is None:
            hint = difflib.get_close_matches(str(name), [*FIELDS, "header.NAME"], n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"ratelimit: key: unknown field {name!r}{also}; fields: see rules/README.md")
        elif STAGE_ORDER[spec.stage] > STAGE_ORDER[stage]:
            problems.append(
                f"ratelimit: key: field {name!r} is not known yet at stage {stage.value}; "
                f"expected stage: {spec.stage.value} or later for this rule"
            )
        elif spec.name in (s.name for s in specs):
            problems.append(f"ratelimit: key: field {name!r} repeats; expected each field once")
        else:
            specs.append(spec)
    return tuple(specs), problems
