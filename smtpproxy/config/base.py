"""Building blocks of the configuration model: the error type, the section base, shared types."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one line per key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def render(self) -> str:
        """Text for the operator: the file, then one problem per line."""
        lines = [f"error: invalid configuration in {self.source}:"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


class Section(BaseModel):
    """Base of every configuration model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True)


PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


def _valid_cidrs(value: list[str]) -> list[str]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"expected CIDR networks like 10.0.0.0/8, got {item!r}") from None
    return value


CidrList = Annotated[list[str], AfterValidator(_valid_cidrs)]


def _domain_names(value: list[str]) -> list[str]:
    out = []
    for domain in value:
        d = domain.strip().lower().rstrip(".")
        if not d or any(c.isspace() for c in d):
            raise ValueError(f"expected domain names, got {domain!r}")
        out.append(d)
    return out


# Domain names, lower-cased and without the final dot.
DomainList = Annotated[list[str], AfterValidator(_domain_names)]


MAILDIR = "maildir:"
DEFAULT_MAILDIR = "maildir:./var/mail"
# The rules and lists shipped inside the package: what runs when the config has no `rules` key.
PACKAGED_RULES = Path(__file__).resolve().parent.parent / "data" / "rules"
