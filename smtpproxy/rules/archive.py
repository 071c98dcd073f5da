"""Content-type sniffing by magic bytes, and the names inside zip archives.

Zip names come from the central directory, parsed here with ``struct`` so
that every cost is bounded by our limits, not by what the archive claims:
entries are never decompressed, except a zip nested in a zip (depth 2), which
is inflated with a hard output cap and skipped when it declares more. A zip
bomb (huge declared sizes, millions of entries, deep nesting) thus costs a few
microseconds.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"MZ", "application/x-dosexec"),
    (b"\x7fELF", "application/x-executable"),
    (b"PK\x03\x04", "application/zip"),
    (b"PK\x05\x06", "application/zip"),
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"Rar!\x1a\x07", "application/x-rar"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (b"\x1f\x8b", "application/gzip"),
    (b"{\\rtf", "application/rtf"),
    (b"MSCF", "application/vnd.ms-cab-compressed"),
    (b"#!", "text/x-shellscript"),
)

_EOCD = b"PK\x05\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_EOCD_SEARCH = 65_536 + 22  # the EOCD record sits within the last 64 KiB + its own size


def sniff(data: bytes) -> str:
    """The content type suggested by the first bytes; application/octet-stream when unknown."""
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    return "application/octet-stream"


@dataclass(frozen=True, slots=True)
class ZipLimits:
    """Bounds on archive inspection."""

    max_depth: int = 2  # 1: names of the attachment itself; 2: also names in a zip inside it
    max_entries: int = 1000  # names read across all levels of one attachment
    max_nested_bytes: int = 2 << 20  # most bytes inflated for one nested zip


@dataclass(frozen=True, slots=True)
class ZipListing:
    """What the central directories of an archive (and nested archives) say."""

    names: tuple[str, ...]
    encrypted: bool  # some entry is encrypted (common for malware that evades scanners)
    truncated: bool  # a limit was reached: there may be more names


def _directory(data: bytes) -> tuple[int, int] | None:
    """Offset and entry count of the central directory, or None for a non-zip."""
    eocd = data.rfind(_EOCD, max(0, len(data) - _EOCD_SEARCH))
    if eocd < 0 or eocd + 22 > len(data):
        return None
    _sig, _disk, _cd_disk, _n_disk, count, cd_size, cd_offset, _clen = struct.unpack(
        "<IHHHHIIH", data[eocd : eocd + 22]
    )
    if (
        (cd_offset == 0xFFFFFFFF or count == 0xFFFF)
        and eocd >= 20
        and data[eocd - 20 : eocd - 16] == b"PK\x06\x07"
    ):
        (z64,) = struct.unpack("<Q", data[eocd - 12 : eocd - 4])
        if data[z64 : z64 + 4] == b"PK\x06\x06" and z64 + 56 <= len(data):
            count, cd_size, cd_offset = struct.unpack("<QQQ", data[z64 + 32 : z64 + 56])
            eocd = z64
    if data[cd_offset : cd_offset + 4] != _CENTRAL:
        # Archives with a prefix (self-extractors, data glued in front): offsets are relative.
        cd_offset = eocd - cd_size
        if cd_offset < 0 or data[cd_offset : cd_offset + 4] != _CENTRAL:
            return None
    return cd_offset, count


def _entry_bytes(data: bytes, local: int, method: int, comp_size: int, limit: int) -> bytes | None:
    """The (inflated) bytes of one entry, or None when unsupported or over ``limit``."""
    if data[local : local + 4] != _LOCAL or comp_size > limit:
        return None
    name_len, extra_len = struct.unpack("<HH", data[local + 26 : local + 30])
    start = local + 30 + name_len + extra_len
    raw = data[start : start + comp_size]
    if method == 0:
        return raw
    if method != 8:
        return None
    try:
        inflater = zlib.decompressobj(-15)
        out = inflater.decompress(raw, limit)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail else out


class _Walker:
    def __init__(self, limits: ZipLimits) -> None:
        self.limits = limits
        self.names: list[str] = []
        self.encrypted = False
        self.truncated = False

    def walk(self, data: bytes, depth: int, prefix: str) -> None:
        found = _directory(data)
        if found is None:
            return
        pos, count = found
        for _ in range(count):
            if len(self.names) >= self.limits.max_entries:
                self.truncated = True
                return
            head = data[pos : pos + 46]
            if len(head) < 46 or not head.startswith(_CENTRAL):
                return
            fields = struct.unpack("<IHHHHHHIIIHHHHHII", head)
            flags, method, comp_size, size = fields[3], fields[4], fields[8], fields[9]
            name_len, extra_len, comment_len, local = fields[10], fields[11], fields[12], fields[16]
            raw_name = data[pos + 46 : pos + 46 + name_len]
            pos += 46 + name_len + extra_len + comment_len
            name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
            self.names.append(prefix + name)
            if flags & 0x1:
                self.encrypted = True
                continue
            if depth < self.limits.max_depth and name.lower().endswith(".zip"):
                if size > self.limits.max_nested_bytes:
                    self.truncated = True
                    continue
                inner = _entry_bytes(data, local, method, comp_size, self.limits.max_nested_bytes)
                if inner is None:
                    self.truncated = True
                    continue
                self.walk(inner, depth + 1, prefix + name + "/")
            elif name.lower().endswith(".zip"):
                self.truncated = True


def zip_listing(data: bytes, limits: ZipLimits | None = None) -> ZipListing | None:
    """The names inside a zip archive (and zips within it), or None when ``data`` is no zip."""
    if _directory(data) is None:
        return None
    walker = _Walker(limits or ZipLimits())
    try:
        walker.walk(data, 1, "")
    except (struct.error, ValueError, OverflowError):
        walker.truncated = True
    return ZipListing(tuple(walker.names), walker.encrypted, walker.truncated)
