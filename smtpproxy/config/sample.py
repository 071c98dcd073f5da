"""The commented sample config, generated from the model so it cannot drift from the defaults.

Every key appears commented out with its default and a one-line meaning. A
commented setting starts with ``#`` directly followed by its YAML (``#listen:``,
``#  timeout:`` inside a section); prose lines start with ``# ``. Removing the
``#`` of every setting line therefore gives a valid config of the defaults,
which is how the tests check this file. ``MEANINGS`` has one line per key; a
test fails when a key of the model has none (or a line names no key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from smtpproxy.config.base import Section

MEANINGS: dict[str, str] = {
    "listen": "host:port to accept SMTP on ([::1]:25 for IPv6); null: no SMTP listener (milter only)",
    "hostname": "our name: banner, Received, Authentication-Results authserv-id",
    "backend": "smtp://host:port, smtps://host:port or maildir:PATH (unset: ./var/mail of the working folder)",
    "backend_options": "how to talk to the backend",
    "backend_options.connect_timeout": "seconds to connect",
    "backend_options.command_timeout": "seconds per SMTP command",
    "backend_options.data_timeout": "seconds for the content and its reply",
    "backend_options.tls_verify": "verify the backend's TLS certificate",
    "backend_options.starttls": "use STARTTLS when the backend offers it",
    "backend_options.pool_size": "most backend connections kept open at once",
    "backend_options.pool_idle_timeout": "seconds an idle backend connection is kept",
    "backend_options.forward_client": "none, xclient or xforward: tell the backend the real client",
    "backend_options.helo_name": "our EHLO name to the backend (null: hostname)",
    "backend_options.require_tls": "send nothing unless TLS to the backend is in place (451 4.3.0 otherwise)",
    "metrics": "host:port of /metrics, /healthz, /readyz (null: off)",
    "relay_domains": "domains we accept mail for (.example.org: its subdomains too)",
    "relay_networks": "CIDRs that may send to any domain (Postfix's mynetworks)",
    "dns": "the resolver shared by every check",
    "dns.nameservers": "IP[:port] list (null: the system's resolv.conf)",
    "dns.timeout": "seconds per DNS query",
    "dns.cache_size": "answers kept in the cache",
    "dns.reverse_lookup": "look up the client's rDNS name",
    "spf": "SPF (RFC 7208) at MAIL FROM",
    "spf.enabled": "check SPF",
    "spf.reject_on_fail": "550 5.7.23 on fail without waiting for DMARC",
    "spf.helo_check": "check the HELO identity when MAIL FROM is <>",
    "spf.tempfail_on_temperror": "451 4.4.3 when DNS fails during SPF",
    "spf.timeout": "seconds for the whole evaluation",
    "dkim": "DKIM verification (RFC 6376)",
    "dkim.enabled": "verify DKIM signatures",
    "dkim.max_signatures": "signatures verified per message (more are ignored)",
    "dkim.min_key_bits": "smaller RSA keys give dkim=policy (RFC 8301)",
    "arc": "ARC chain validation (RFC 8617)",
    "arc.enabled": "validate ARC chains",
    "dmarc": "DMARC (RFC 7489) at end of DATA",
    "dmarc.enabled": "evaluate DMARC",
    "dmarc.enforce": "apply p=reject (550 5.7.1) and p=quarantine",
    "dmarc.temperror_action": "tempfail (451 4.4.3) or accept when DNS fails",
    "dmarc.report_only": "record and add headers, never act",
    "dmarc.quarantine_header": "header added to messages of p=quarantine",
    "dmarc.trusted_arc_sealers": "ARC sealers whose passing chain overrides a DMARC failure",
    "rules": "folder of rule files (default: the packaged rules, see `smtpproxy rules path`; null: none)",
    "rules_options": "how the rules folder is watched",
    "rules_options.reload_interval": "seconds between checks for changed files (0: only SIGHUP)",
    "scores": "score thresholds of the rules (null: off)",
    "scores.add_header": "add X-Spam-Flag and X-Spam-Score",
    "scores.quarantine": "quarantine (to quarantine_to when set)",
    "scores.tempfail": "451 4.7.1",
    "scores.reject": "550 5.7.1",
    "scores.quarantine_to": "maildir:PATH or smtp://host:port for quarantined mail (null: deliver marked)",
    "limits": "per-message and per-connection limits",
    "limits.max_message_size": "bytes (552 5.3.4)",
    "limits.max_recipients": "recipients per message (452 4.5.3)",
    "limits.max_messages_per_connection": "messages per connection",
    "limits.idle_timeout": "seconds of client silence (421 4.4.2)",
    "limits.max_connections": "connections at once (421 4.7.0)",
    "limits.max_connections_per_ip": "connections at once from one client address (421 4.7.0; null: off)",
    "limits.max_inflight_bytes": "message bytes in flight, all sessions (452 4.3.1; null: an eighth of RAM)",
    "limits.max_line_length": "bytes per command or content line",
    "limits.messages_per_connection_action": "disconnect (421 4.7.0) or tempfail (450 4.7.1)",
    "tls": "inbound STARTTLS, offered when cert and key are set",
    "tls.cert": "PEM certificate chain file",
    "tls.key": "PEM private key file",
    "tls.min_version": "TLSv1.2 or TLSv1.3",
    "proxy_protocol": "PROXY protocol v1/v2 from load balancers",
    "proxy_protocol.trusted_networks": "CIDRs whose connections must start with a PROXY header",
    "proxy_protocol.timeout": "seconds to wait for the header",
    "log": "logging",
    "log.format": "json or text",
    "log.level": "debug, info, warning or error",
    "shutdown_grace": "seconds transactions in flight get after SIGTERM",
    "workers": "serving processes on the one port",
    "check_timeout": "seconds a check may take",
    "on_check_error": "tempfail (451 4.3.0) or continue when a check fails",
    "ratelimits": "rate and concurrency limits (see README, Rate limits)",
    "ratelimit_store": "memory or redis://host:port/db",
    "ratelimit_store_timeout": "seconds per store request",
    "ratelimit_fail": "open (allow) or closed (4xx) when the store fails",
    "ratelimit_exempt": "CIDRs no rate limit applies to",
    "ratelimit_memory_max_keys": "keys the memory store keeps",
    "ratelimit_concurrency_ttl": "seconds a concurrency slot lives without its owner",
    "milter": "the same policy as a milter inside the MTA (Postfix smtpd_milters)",
    "milter.listen": "host:port or unix:/path (mode 0660) to serve the milter on; null: no milter",
    "session_limits": "per-connection limits (null: unlimited); 421 and close",
    "session_limits.max_transactions": "MAIL commands per connection",
    "session_limits.max_invalid_commands": "unknown or malformed commands",
    "session_limits.max_rejected_recipients": "refused RCPTs",
    "session_limits.max_junk_commands": "NOOP, RSET, VRFY, EXPN, HELP, repeated HELO since a delivery",
    "session_limits.max_errors": "error replies of any kind",
    "session_limits.max_duration": "seconds since connect (421 4.4.2)",
    "session_limits.tarpit_delay": "seconds of delay per error so far (0: off)",
    "session_limits.tarpit_max": "most seconds of tarpit delay",
    "submission": "submission listeners, AUTH and sender_login (null: off; see README, Submission)",
    "dkim_sign": "outbound DKIM keys: [{domain, selector, key}] (see `smtpproxy dkim keygen`)",
}


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of ``model`` as a dotted name, sections before their own keys."""
    out = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        out.append(prefix + name)
        default = field.get_default(call_default_factory=True)
        if isinstance(default, Section):
            out += keys(type(default), f"{prefix}{name}.")
    return out


def _value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    # JSON is YAML: one unambiguous spelling for strings, lists and null.
    return json.dumps(value)


def _lines(model: BaseModel, prefix: str, indent: str) -> list[str]:
    lines = []
    for name, field in type(model).model_fields.items():
        if field.exclude:
            continue
        meaning = MEANINGS[prefix + name]
        value = getattr(model, name)
        if isinstance(value, Section):
            lines.append(f"#{indent}{name}:  # {meaning}")
            lines += _lines(value, f"{prefix}{name}.", indent + "  ")
        elif prefix + name == "rules":
            continue  # written active by sample_config: it names the folder `init` wrote
        else:
            lines.append(f"#{indent}{name}: {_value(value)}  # {meaning}")
    return lines


def sample_config(defaults: BaseModel, *, rules: str = "rules") -> str:
    """The commented config of ``defaults`` (a ``Config``), with ``rules`` set to the folder ``rules``."""
    head = [
        "# smtpproxy configuration (written by `smtpproxy init`).",
        "# Every key is listed with its default, commented out: a key you leave",
        "# out keeps its default. Relative paths you write resolve against the",
        "# folder of this file. Check it with: smtpproxy config --config FILE",
        "",
        f"# {MEANINGS['rules']}",
        f"rules: {_value(rules)}",
        "",
    ]
    return "\n".join(head + _lines(defaults, "", "")) + "\n"
