"""``smtpproxy --version``: our version and the versions of the mail libraries doing the work."""

from __future__ import annotations

import platform
from importlib import metadata

from smtpproxy import __version__

# The distributions whose behaviour a bug report needs to know.
LIBRARIES = (
    "aiosmtpd",
    "aiosmtplib",
    "pyspf",
    "dkimpy",
    "dnspython",
    "authres",
    "google-re2",
    "pydantic",
    "prometheus-client",
    "redis",
)


def version_text() -> str:
    """``smtpproxy X.Y.Z`` and one ``name version`` line per library (``not installed`` when absent)."""
    lines = [f"smtpproxy {__version__}", f"python {platform.python_version()}"]
    for name in LIBRARIES:
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name} not installed")
    return "\n".join(lines)
