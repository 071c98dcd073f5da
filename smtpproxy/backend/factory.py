"""The one place a backend URL becomes a Backend (the proxy, workers' probes, quarantine release)."""

from __future__ import annotations

from smtpproxy.backend import Backend
from smtpproxy.backend.maildir import MaildirBackend
from smtpproxy.backend.smtp import SmtpBackend
from smtpproxy.config import Config
from smtpproxy.metrics import Metrics


def make_backend(url: str, config: Config, metrics: Metrics) -> Backend:
    """A Backend for ``smtp://``, ``smtps://`` or ``maildir:`` URLs."""
    if url.startswith("maildir:"):
        return MaildirBackend(config.path(url[len("maildir:") :]))
    return SmtpBackend(url, config.backend_options, config.hostname, metrics)
