"""The ``milter`` section: where the milter listener (Postfix ``smtpd_milters``) is bound."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import field_validator

from smtpproxy.addresses import parse_hostport
from smtpproxy.config.base import Section

UNIX = "unix:"


@dataclass(frozen=True, slots=True)
class MilterAddress:
    """Where to listen: a TCP ``host``/``port``, or a unix socket ``path`` (mode 0660)."""

    host: str = ""
    port: int = 0
    path: Path | None = None


def parse_milter_address(value: str) -> MilterAddress:
    """``host:port``, ``[v6]:port`` or ``unix:/path``; ValueError saying what was expected."""
    if value.startswith(UNIX):
        path = value[len(UNIX) :]
        if not path:
            raise ValueError(f"expected unix:/path/to/socket with a path, got {value!r}")
        return MilterAddress(path=Path(path))
    try:
        hp = parse_hostport(value)
    except ValueError:
        raise ValueError(f"expected host:port or unix:/path, got {value!r}") from None
    return MilterAddress(hp.host, hp.port)


class MilterConfig(Section):
    """The milter listener; ``listen: null`` (the default) serves no milter."""

    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_milter_address(value)
        return value

    @property
    def address(self) -> MilterAddress | None:
        """``listen`` parsed; None when no milter is served."""
        return None if self.listen is None else parse_milter_address(self.listen)
