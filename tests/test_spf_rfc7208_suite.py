"""The OpenSPF RFC 7208 test suite, run through SpfChecker and the real resolver path.

The suite ships in pyspf's source distribution. It is fetched at test time into a
cache folder ($SMTPPROXY_TEST_CACHE, default ~/.cache/smtpproxy-tests) and never
committed; the module is skipped with the reason when it cannot be had. Each
scenario's zone data is served by a DnsServer; each case is one test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtpproxy.auth.spf import SpfChecker
from smtpproxy.dns import Resolver
from tests.dnsserver import DnsServer, ZoneValue

PYSPF_SDIST = "pyspf-2.0.14.tar.gz"
SUITE_MEMBER = "pyspf-2.0.14/test/rfc7208-tests.yml"

# Cases where a result differs from the suite, each with why.
EXPECTED_FAILURES: dict[str, str] = {
    "null-text": "the zone holds a TXT record with no character-strings, illegal RDATA (RFC 1035 3.3.14): "
    "dnspython refuses the whole DNS answer as malformed, so we return temperror (retry) instead of "
    "pass; real servers do not serve such a record",
}


def _cache_dir() -> Path:
    return Path(os.environ.get("SMTPPROXY_TEST_CACHE", Path.home() / ".cache" / "smtpproxy-tests"))


def _load_suite() -> list[dict[str, Any]]:
    """The suite's scenarios, downloading pyspf's sdist into the cache when missing."""
    cache = _cache_dir()
    sdist = cache / PYSPF_SDIST
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["pyspf==2.0.14", "-d", str(cache)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=180)
        except (OSError, subprocess.SubprocessError) as err:
            pytest.skip(
                f"RFC 7208 suite unavailable: cannot download {PYSPF_SDIST}: {err}", allow_module_level=True
            )
    try:
        with tarfile.open(sdist) as tar:
            member = tar.extractfile(SUITE_MEMBER)
            assert member is not None
            return [doc for doc in yaml.safe_load_all(member.read()) if doc]
    except (OSError, KeyError, tarfile.TarError, AssertionError) as err:
        pytest.skip(f"RFC 7208 suite unreadable in {sdist}: {err}", allow_module_level=True)


def zone_from_suite(zonedata: dict[str, list[Any]]) -> dict[str, ZoneValue]:
    """Convert the suite's zone data to DnsServer records, as pyspf's own driver does.

    SPF (type 99) records are also served as TXT when the name has no TXT entry
    (RFC 7208 dropped type SPF; the suite relies on this duplication). ``NONE``
    suppresses a record; a bare ``TIMEOUT`` entry makes unlisted types time out.
    """
    zone: dict[str, ZoneValue] = {}
    for name, entries in zonedata.items():
        records: list[tuple[str, Any]] = []
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        timeout = False
        for entry in entries:
            if entry == "TIMEOUT":
                timeout = True
                continue
            for rdtype, value in entry.items():
                if rdtype in ("TXT", "SPF"):
                    strings = (value,) if isinstance(value, str) else tuple(value)
                    if strings == ("NONE",):
                        continue
                    records.append((rdtype, list(strings)))
                    if rdtype == "SPF" and not has_txt:
                        records.append(("TXT", list(strings)))
                elif rdtype == "MX":
                    pref, host = value
                    records.append(("MX", f"{pref} {host or '.'}"))
                else:
                    records.append((rdtype, str(value)))
        if timeout and not records:
            zone[name] = "TIMEOUT"
        else:
            zone[name] = records + ([("TIMEOUT", "")] if timeout else [])
    return zone


SCENARIOS = _load_suite()
CASES = [
    pytest.param(
        index,
        case_id,
        marks=[pytest.mark.xfail(reason=EXPECTED_FAILURES[case_id], strict=True)]
        if case_id in EXPECTED_FAILURES
        else [],
        id=case_id,
    )
    for index, scenario in enumerate(SCENARIOS)
    for case_id in scenario["tests"]
]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[int, DnsServer]]:
    """One DNS server per scenario, started on first use."""
    running: dict[int, DnsServer] = {}
    yield running
    for server in running.values():
        server.stop()


@pytest.mark.parametrize(("scenario_index", "case_id"), CASES)
async def test_rfc7208_case(servers: dict[int, DnsServer], scenario_index: int, case_id: str) -> None:
    scenario = SCENARIOS[scenario_index]
    case = scenario["tests"][case_id]
    if scenario_index not in servers:
        server = DnsServer(zone_from_suite(scenario["zonedata"]))
        server.start()
        servers[scenario_index] = server
    # 2 s: most lookups expect a real answer, which a loaded 2-core machine may take
    # longer than 0.2 s to give; the suite's TIMEOUT names wait this long on purpose.
    resolver = Resolver([servers[scenario_index].address], timeout=2.0)
    checker = SpfChecker(resolver, timeout=10.0)
    result = await checker.check(case["host"], case["mailfrom"], case["helo"])
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert result.result in expected, f"{case.get('spec')}: {case.get('description', '')} ({result})"


def test_suite_is_complete() -> None:
    assert len(SCENARIOS) == 16
    assert len(CASES) == 203
