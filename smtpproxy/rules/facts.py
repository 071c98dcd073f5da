"""The message facts of a transaction, each layer computed at most once, when a rule first reads it.

Cached in ``txn.extras`` (so every stage and every rule of the transaction
shares them): header fields, decoded headers, From, the MIME walk, the body
text, the URLs. Before DATA (no message yet) every fact is empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from smtpproxy.rules.mime import (
    BodyParts,
    BodyText,
    decoded_headers,
    find_urls,
    from_parts,
    read_text,
    walk_parts,
)
from smtpproxy.rules.rawmime import Field, raw_header_fields
from smtpproxy.session import Transaction

T = TypeVar("T")
Names = tuple[tuple[str, ...], tuple[str, ...]]
NO_NAMES: Names = ((), ())


def _cached(txn: Transaction | None, key: str, compute: Callable[[Transaction], T], empty: T) -> T:
    if txn is None or not txn.message:
        return empty
    found: Any = txn.extras.get(key)
    if found is None:
        found = compute(txn)
        txn.extras[key] = found
    return found  # type: ignore[no-any-return]


# The facts as big as the content (decoded parts, their text): the server
# drops them once the DATA checks have run, so a message on its way to the
# backend is not held twice more.
CONTENT_FACTS = ("rules_body", "rules_body_text", "rules_urls")


def drop_content_facts(txn: Transaction) -> None:
    """Forget the content-sized facts (the end-of-DATA rules have run)."""
    for key in CONTENT_FACTS:
        txn.extras.pop(key, None)


def header_fields(txn: Transaction | None) -> list[Field]:
    """Raw (name, value) header fields, in order."""
    return _cached(txn, "rules_raw_headers", lambda t: raw_header_fields(t.message), [])


def headers(txn: Transaction | None) -> dict[str, tuple[str, ...]]:
    """Decoded header fields by lower-case name."""
    return _cached(txn, "rules_headers", lambda t: decoded_headers(header_fields(t)), {})


def from_field(txn: Transaction | None) -> Names:
    """Display names and addresses of From."""
    return _cached(txn, "rules_from", lambda t: from_parts(header_fields(t)), NO_NAMES)


def body_parts(txn: Transaction | None) -> BodyParts:
    """The MIME walk: attachments and the (still encoded) text parts."""
    return _cached(txn, "rules_body", lambda t: walk_parts(t.message), BodyParts((), (), 0))


def body_text(txn: Transaction | None) -> BodyText:
    """The text of the text parts."""
    return _cached(txn, "rules_body_text", lambda t: read_text(body_parts(t)), BodyText("", (), ()))


def body_urls(txn: Transaction | None) -> Names:
    """URLs of the body and their host names."""
    return _cached(txn, "rules_urls", lambda t: find_urls(body_text(t)), NO_NAMES)
