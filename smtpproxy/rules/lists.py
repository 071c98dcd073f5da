"""Named lists used by ``in_list``: domains, addresses, CIDR networks and regexes.

A list is written inline in a rule or kept in a file (one entry per line,
``#`` starts a comment). Each entry is recognised by its shape:

- ``192.0.2.0/24``, ``2001:db8::/32``, ``198.51.100.7``: a network (for IP fields);
- ``/^news(letter)?@/``: a regular expression (RE2, case-insensitive);
- anything else: a string, compared case-insensitively; with ``subdomains``
  an entry ``example.com`` also matches ``mail.example.com``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2

from smtpproxy.rules.loader import Problem
from smtpproxy.session import IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A list file larger than this is refused: lists are loaded into memory on every reload.
MAX_LIST_ENTRIES = 1_000_000


def _regex_options() -> Any:
    options = re2.Options()
    # RE2 would also print each bad pattern to stderr through absl ("WARNING: All log
    # messages before absl::InitializeLog()", "E0000 ... re2.cc"): our error names it.
    options.log_errors = False
    options.case_sensitive = False
    options.max_mem = 64 << 20
    return options


@dataclass(frozen=True, slots=True)
class RuleList:
    """A compiled list: exact strings (lower-cased), networks and regexes."""

    name: str
    strings: frozenset[str]
    networks: tuple[IPNetwork, ...]
    regex_entries: tuple[str, ...]
    regex_set: Any  # re2.Set over regex_entries, None when there are none
    subdomains: bool = False

    def __len__(self) -> int:
        return len(self.strings) + len(self.networks) + len(self.regex_entries)

    def match_text(self, value: str, *, subdomains: bool | None = None) -> str | None:
        """The entry that ``value`` matches (case-insensitive), or None."""
        low = value.lower()
        if low in self.strings:
            return low
        if self.subdomains if subdomains is None else subdomains:
            rest = low.rstrip(".")
            while "." in rest:
                rest = rest.partition(".")[2]
                if rest in self.strings:
                    return rest
        if self.regex_set is not None:
            hits = self.regex_set.Match(value)
            if hits:
                return "/" + str(self.regex_entries[min(hits)]) + "/"
        return None

    def match_ip(self, ip: IPAddress) -> str | None:
        """The network (or exact address entry) containing ``ip``, or None."""
        text = str(ip)
        if text in self.strings:
            return text
        for net in self.networks:
            if ip.version == net.version and ip in net:
                return str(net)
        return None


def _parse_entry(entry: str) -> tuple[str, Any]:
    """Classify one entry: ("regex", pattern), ("network", net) or ("string", text)."""
    if len(entry) >= 2 and entry.startswith("/") and entry.endswith("/"):
        return "regex", entry[1:-1]
    if ":" in entry or entry[:1].isdigit():
        try:
            return "network", ipaddress.ip_network(entry, strict=False)
        except ValueError:
            pass
    return "string", entry.lower()


def build_list(
    name: str, entries: Iterable[tuple[int, str]], *, file: str, rule: str = "", subdomains: bool = False
) -> tuple[RuleList, list[Problem]]:
    """Compile ``(line, entry)`` pairs into a RuleList; bad entries become problems."""
    strings: set[str] = set()
    networks: list[IPNetwork] = []
    regexes: list[str] = []
    problems: list[Problem] = []
    for line, raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        kind, value = _parse_entry(entry)
        if kind == "regex":
            try:
                re2.compile(value, _regex_options())
            except re2.error as err:
                problems.append(
                    Problem(
                        file, line, rule, f"list {name}: invalid regex {entry!r}: {err}; expected RE2 syntax"
                    )
                )
                continue
            regexes.append(value)
        elif kind == "network":
            networks.append(value)
            if value.num_addresses == 1:
                strings.add(str(value.network_address))
        else:
            strings.add(value)
    regex_set = None
    if regexes:
        regex_set = re2.Set.SearchSet(_regex_options())
        for pattern in regexes:
            regex_set.Add(pattern)
        regex_set.Compile()
    # Most specific first is not needed for a yes/no answer; keep file order for evidence.
    return RuleList(
        name, frozenset(strings), tuple(networks), tuple(regexes), regex_set, subdomains
    ), problems


def read_list_file(
    path: Path, display: str, name: str, *, subdomains: bool = False
) -> tuple[RuleList, list[Problem]]:
    """Load a list file: one entry per line, blank lines and ``#`` comments ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return build_list(name, [], file=display)[0], [
            Problem(display, 0, "", f"list {name}: file not found")
        ]
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        return build_list(name, [], file=display)[0], [
            Problem(display, 0, "", f"list {name}: cannot read: {reason}")
        ]
    entries: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        # A comment after an entry needs a space before '#', so regexes may contain '#'.
        cut = stripped.find(" #")
        entry = stripped[:cut].strip() if cut >= 0 else stripped
        entries.append((number, entry))
        if len(entries) > MAX_LIST_ENTRIES:
            problem = Problem(display, number, "", f"list {name}: more than {MAX_LIST_ENTRIES} entries")
            return build_list(name, [], file=display)[0], [problem]
    return build_list(name, entries, file=display, subdomains=subdomains)
