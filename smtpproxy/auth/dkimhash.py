"""One DKIM signature checked against a parsed message: dkimpy's ``verify_sig_process``, cheaper.

dkimpy re-parses the signature and the key and canonicalises every header
field for each signature it checks. Here the caller hands in the tags it
already parsed and a cached :class:`~smtpproxy.auth.dkimkey.DkimKey`; only the
fields named in h= are canonicalised (selection does not depend on
canonicalisation: names are matched case-insensitively either way), the body
is canonicalised once per algorithm and message, and whitespace rewriting is
skipped when a byte scan shows nothing to rewrite. Results, and the dkimpy
exceptions raised for bad signatures, are the same as ``DKIM.verify``'s
(tests/test_dkim.py compares them).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence

import dkim
import nacl.exceptions
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    strip_trailing_lines,
)

from smtpproxy.auth.dkimkey import DkimKey, rsa_verify

Header = tuple[bytes, bytes]

# dkimpy's RE_BTAG (the b= tag's value, to blank it out) matches the same text,
# but its nested optional whitespace groups cost ~40 us on a 2048-bit signature:
# "(?:FWS b64char)*" is "any run of whitespace and b64 characters that ends with
# a b64 character", which a character class scans in C (tests/test_dkim.py
# compares the two on random input).
_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")
_LINE_BREAK = re.compile(rb"\r?\n")
_SPACES = re.compile(rb"\s+")
_H_SEPARATOR = re.compile(rb"\s*:\s*")


def _compress(content: bytes) -> bytes:
    if b"\t" not in content and b"  " not in content:
        return content  # every WSP run is already a single space
    return _WSP.sub(b" ", content)


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 (dkimpy's ``Relaxed.canonicalize_body``)."""
    if b" \r\n" in body or b"\t" in body:
        body = _TRAILING_WSP.sub(b"\r\n", body)
    body = strip_trailing_lines(_compress(body))
    return b"" if body == b"\r\n" else body


def relaxed_header(name: bytes, value: bytes) -> Header:
    """RFC 6376 §3.4.2 for one field (dkimpy's ``Relaxed.canonicalize_headers``)."""
    unfolded = value.endswith(b"\r\n") and b"\n" not in value[:-2]  # only the line end to drop
    value = value[:-2] if unfolded else _LINE_BREAK.sub(b"", value)
    return name.lower().rstrip(), _compress(value).strip() + b"\r\n"


def parse_message(message: bytes) -> tuple[list[Header], bytes]:
    """(header fields as [name, value], body): ``dkim.rfc822_parse``'s result, raising as it does.

    dkimpy splits the whole message into lines and joins the body back; when
    every line ends in CRLF the body is simply the bytes after the blank line.
    Continuation lines are collected and joined once per field: dkimpy's
    ``value += line`` is quadratic in a field's length (one folded field of a
    few MB held the event loop for seconds).
    """
    if message.count(b"\n") != message.count(b"\r\n"):
        # A bare LF: dkimpy takes CRLF or LF as the line end and rewrites the body with CRLF.
        lines = _LINE_BREAK.split(message)
        end = lines.index(b"") if b"" in lines else len(lines)
        body = b"\r\n".join(lines[end + 1 :])
        del lines[end:]
    else:
        end = message.find(b"\r\n\r\n")
        if message.startswith(b"\r\n"):
            lines, body = [], message[2:]
        elif end >= 0:
            lines, body = message[:end].split(b"\r\n"), message[end + 4 :]
        else:
            lines, body = message.split(b"\r\n"), b""
    headers: list[tuple[bytes, list[bytes]]] = []
    for line in lines:
        if not line:
            break  # only the last line of a message without a body can be empty here
        if line[0] in (0x09, 0x20):
            headers[-1][1].append(line)  # IndexError on a leading continuation, as in dkimpy
            continue
        match = _FIELD_NAME.match(line)
        if match is not None:
            headers.append((match.group(1), [line[match.end() :]]))
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return [(name, b"\r\n".join(parts) + b"\r\n") for name, parts in headers], body


class Body:
    """The body of one message, canonicalised at most once per algorithm."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._done: dict[bytes, bytes] = {}

    def canonical(self, algorithm: bytes) -> bytes:
        """The body under b"simple" or b"relaxed"."""
        done = self._done.get(algorithm)
        if done is None:
            done = relaxed_body(self.raw) if algorithm == b"relaxed" else strip_trailing_lines(self.raw)
            self._done[algorithm] = done
        return done


def _select(headers: Sequence[Header], include: Sequence[bytes]) -> list[Header]:
    """dkimpy's ``select_headers``: for each name in h=, the next instance from the bottom."""
    chosen: list[Header] = []
    last: dict[bytes, int] = {}
    for name in include:
        i = last.get(name, len(headers))
        while i > 0:
            i -= 1
            if name == headers[i][0].lower():
                chosen.append(headers[i])
                break
        last[name] = i
    return chosen


def canonicalization(tags: Mapping[bytes, bytes]) -> tuple[bytes, bytes]:
    """The (header, body) algorithm names of c=; dkimpy's MessageFormatError when invalid."""
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as err:
        raise dkim.MessageFormatError(f"invalid c= value: {err.args[0]}") from err
    return policy.header_algorithm.name, policy.body_algorithm.name


def verify_signature(
    headers: Sequence[Header], body: Body, tags: Mapping[bytes, bytes], index: int, key: DkimKey
) -> bool:
    """Whether DKIM-Signature number ``index`` (its ``tags``) verifies with ``key``.

    Raises dkimpy's ``ValidationError`` (body hash mismatch, s=tlsrpt key),
    ``MessageFormatError`` (bad c=) and ``UnknownKeyTypeError`` as dkimpy would.
    """
    include = [h.lower() for h in _H_SEPARATOR.split(tags[b"h"])]
    sig_header = [h for h in headers if h[0].lower() == b"dkim-signature"][index]
    return verify_signed_fields(headers, body, tags, include, sig_header, key)


def verify_signed_fields(
    headers: Sequence[Header],
    body: Body,
    tags: Mapping[bytes, bytes],
    include: list[bytes],
    sig_header: Header,
    key: DkimKey,
) -> bool:
    """dkimpy's ``verify_sig_process``: the signature field ``sig_header`` (tags ``tags``)
    over the fields named in ``include`` (lower-case) and the body, checked with ``key``.

    Shared by DKIM-Signature and by ARC's ARC-Message-Signature and ARC-Seal.
    """
    if key.tlsrpt:
        raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
    header_algo, body_algo = canonicalization(tags)
    hasher = dkim.HASH_ALGORITHMS[tags[b"a"]]
    if b"bh" in tags:
        canonical = body.canonical(body_algo)
        if b"l" in tags:
            canonical = canonical[: int(tags[b"l"])]
        body_hash = hasher(canonical).digest()
        if body_hash != base64.b64decode(_SPACES.sub(b"", tags[b"bh"])):
            raise dkim.ValidationError(
                f"body hash mismatch (got {base64.b64encode(body_hash)!r}, expected {tags[b'bh']!r})"
            )
    if b"from" in include:
        include = [*include, b"from"]  # dkimpy's fix for extra From fields (Launchpad #644046)
    sig_name, sig_value = sig_header
    unsigned_sig = (sig_name, _BTAG.sub(b"\\1", sig_value))
    fields = _select(headers, include)
    if header_algo == b"relaxed":
        fields = [relaxed_header(n, v) for n, v in fields]
        unsigned_sig = relaxed_header(*unsigned_sig)
    # The signature field is hashed without its trailing CRLF.
    data = [*fields, (unsigned_sig[0], unsigned_sig[1].rstrip())]
    digest = hasher(b"".join(n + b":" + v for n, v in data)).digest()
    signature = base64.b64decode(_SPACES.sub(b"", tags[b"b"]))
    if key.ktag == b"rsa":
        return rsa_verify(key, tags[b"a"], digest, signature)
    if key.ktag == b"ed25519":
        try:
            key.pk.verify(digest, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True
    raise dkim.UnknownKeyTypeError(key.ktag)
