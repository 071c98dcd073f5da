"""MIME facts for rules: bodies, URLs, attachments, zip listings, and broken input."""

from __future__ import annotations

import io
import struct
import zipfile
from email.message import EmailMessage

import pytest

from smtpproxy.rules.archive import ZipLimits, sniff, zip_listing
from smtpproxy.rules.mime import decode_words, html_to_text, parse_body


def zip_of(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def with_attachment(data: bytes, filename: str, ctype: str = "application/octet-stream") -> bytes:
    m = EmailMessage()
    m["Subject"] = "x"
    m.set_content("see attached\n")
    main, sub = ctype.split("/")
    m.add_attachment(data, maintype=main, subtype=sub, filename=filename)
    return m.as_bytes()


def test_html_only_body_becomes_text_with_links() -> None:
    raw = (
        b"Subject: x\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"<html><head><style>p {color: red}</style><script>var hidden = 'SECRET';</script></head>"
        b'<body><p>Caf=C3=A9 &amp; <b>cr&egrave;me</b></p><a href=3D"https://Click.Example.com/t?u=3D1">here</a>'
        b"<img src='http://img.example.org/p.gif'></body></html>\r\n"
    )
    facts = parse_body(raw)
    assert "Café & crème" in facts.text
    assert "SECRET" not in facts.text and "color" not in facts.text
    assert facts.urls == ("https://Click.Example.com/t?u=1", "http://img.example.org/p.gif")
    assert facts.url_domains == ("click.example.com", "img.example.org")


def test_html_with_unclosed_tags_and_script_is_linear_and_safe() -> None:
    text, links = html_to_text("<" * 50_000 + "<script>" + "x" * 1000)
    assert "x" not in text and links == []


def test_nested_multiparts_are_all_read() -> None:
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("text of the forwarded message\n")
    alt = EmailMessage()
    alt.set_content("plain alternative\n")
    alt.add_alternative("<p>html <i>alternative</i> www.example.net/x</p>", subtype="html")
    outer = EmailMessage()
    outer["Subject"] = "outer"
    outer.make_mixed()
    outer.attach(alt)
    outer.add_attachment(inner)
    outer.add_attachment(b"%PDF-1.7 ...", maintype="application", subtype="pdf", filename="a.pdf")
    facts = parse_body(outer.as_bytes())
    assert "plain alternative" in facts.text
    assert "html alternative" in facts.text
    assert "text of the forwarded message" in facts.text
    assert facts.urls == ("www.example.net/x",)
    assert [(a.filename, a.extension, a.detected_type) for a in facts.attachments] == [
        ("a.pdf", "pdf", "application/pdf")
    ]


def test_charsets_and_transfer_encodings_are_decoded() -> None:
    raw = (
        b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b"R3L832Uh\r\n"
    )
    assert parse_body(raw).text.strip() == "Grüße!"


def test_unknown_charset_degrades_instead_of_raising() -> None:
    raw = b"Subject: x\r\nContent-Type: text/plain; charset=x-klingon\r\n\r\nqapla\xff\r\n"
    assert "qapla" in parse_body(raw).text


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe garbage without headers",
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nunterminated',
        b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter at all",
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64@@@\r\n",
        b'Content-Type: application/zip; name="a.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\nUEsFBgAA\r\n',
        b"Subject: =?utf-8?q?broken=ZZ?= =?nope?b?!!!?=\r\n\r\nx",
        b"Content-Type: message/rfc822\r\n\r\nContent-Type: multipart/alternative; boundary=x\r\n\r\n--x\r\n",
    ],
)
def test_broken_mime_never_raises(raw: bytes) -> None:
    facts = parse_body(raw)
    assert isinstance(facts.text, str)


def test_rfc2047_decoding_handles_garbage() -> None:
    assert decode_words("=?utf-8?q?caf=C3=A9?= ok") == "café ok"
    assert decode_words("=?x-unknown?q?abc?=") == "abc"
    assert decode_words("plain") == "plain"


def test_attachment_extension_is_the_last_one_ignoring_trailing_dots() -> None:
    facts = parse_body(with_attachment(b"MZ", "Invoice.PDF.exe. "))
    (att,) = facts.attachments
    assert att.extension == "exe"
    assert att.detected_type == "application/x-dosexec"
    assert att.declared_type == "application/octet-stream"
    assert att.size == 2


def test_zip_names_are_listed_from_the_attachment() -> None:
    facts = parse_body(
        with_attachment(zip_of([("a/readme.txt", b"x"), ("b.EXE", b"MZ")]), "x.zip", "application/zip")
    )
    (att,) = facts.attachments
    assert att.archive is not None and att.archive.names == ("a/readme.txt", "b.EXE")


def test_zip_in_zip_is_read_to_depth_two_only() -> None:
    level3 = zip_of([("deep.exe", b"MZ")])
    level2 = zip_of([("mid.js", b"x"), ("level3.zip", level3)])
    level1 = zip_of([("level2.zip", level2)])
    listing = zip_listing(level1)
    assert listing is not None
    assert listing.names == ("level2.zip", "level2.zip/mid.js", "level2.zip/level3.zip")
    assert listing.truncated  # level3.zip was not opened
    deeper = zip_listing(level1, ZipLimits(max_depth=3))
    assert deeper is not None and "level2.zip/level3.zip/deep.exe" in deeper.names


def test_stored_nested_zip_is_read_without_inflating() -> None:
    inner = zip_of([("x.vbs", b"x")])
    listing = zip_listing(zip_of([("in.zip", inner)], method=zipfile.ZIP_STORED))
    assert listing is not None and listing.names == ("in.zip", "in.zip/x.vbs")


def test_entry_count_is_bounded() -> None:
    many = zip_of([(f"f{i}.txt", b"") for i in range(1500)], method=zipfile.ZIP_STORED)
    listing = zip_listing(many, ZipLimits(max_entries=1000))
    assert listing is not None and len(listing.names) == 1000 and listing.truncated


def _patch_sizes(data: bytes, uncompressed: int) -> bytes:
    """Rewrite every central-directory entry to declare ``uncompressed`` bytes (a zip bomb's shape)."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        struct.pack_into("<I", out, pos + 24, uncompressed)
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


def test_zip_bomb_shape_costs_nothing() -> None:
    inner = zip_of([("bomb.bin", b"\0" * 1_000_000)])
    bomb = _patch_sizes(zip_of([("inner.zip", inner), ("big.bin", b"\0" * 100_000)]), 0xFFFFFFFE)
    listing = zip_listing(bomb)
    assert listing is not None
    assert listing.names == ("inner.zip", "big.bin")  # inner.zip declared 4 GB: never inflated
    assert listing.truncated


def test_nested_zip_that_inflates_past_the_cap_is_not_read() -> None:
    inner = zip_of([("zeros.bin", b"\0" * 100)])
    # 3 MB of zeros that lie about their size (declared 100 bytes): inflation stops at the cap.
    padded = _patch_sizes(zip_of([("inner.zip", inner + b"\0" * 3_000_000)]), 100)
    honest = zip_listing(padded, ZipLimits(max_nested_bytes=1 << 20))
    assert honest is not None and honest.names == ("inner.zip",) and honest.truncated


def test_encrypted_entries_are_flagged() -> None:
    data = bytearray(zip_of([("secret.exe", b"MZ")], method=zipfile.ZIP_STORED))
    pos = data.find(b"PK\x01\x02")
    flags = struct.unpack_from("<H", data, pos + 8)[0]
    struct.pack_into("<H", data, pos + 8, flags | 1)
    listing = zip_listing(bytes(data))
    assert listing is not None and listing.encrypted and listing.names == ("secret.exe",)


@pytest.mark.parametrize(
    "data", [b"", b"PK\x03\x04 truncated", b"not a zip at all", b"PK\x05\x06" + b"\xff" * 18]
)
def test_non_zips_and_truncated_zips(data: bytes) -> None:
    listing = zip_listing(data)
    assert listing is None or listing.names == ()


def test_zip_with_a_prefix_is_still_listed() -> None:
    listing = zip_listing(b"MZ self-extractor stub " * 10 + zip_of([("a.exe", b"x")]))
    assert listing is not None and listing.names == ("a.exe",)


@pytest.mark.parametrize(
    ("head", "ctype"),
    [
        (b"MZ\x90\x00", "application/x-dosexec"),
        (b"%PDF-1.4", "application/pdf"),
        (b"PK\x03\x04", "application/zip"),
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
        (b"hello", "application/octet-stream"),
    ],
)
def test_sniff(head: bytes, ctype: str) -> None:
    assert sniff(head + b"rest") == ctype


def test_body_text_is_bounded() -> None:
    raw = b"Subject: x\r\n\r\n" + b"a" * 3_000_000
    assert len(parse_body(raw).text) <= 1_000_000
