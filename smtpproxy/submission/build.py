"""Build the submission policy from the config (the App calls this once; SIGHUP reloads its files)."""

from __future__ import annotations

from smtpproxy.config import Config
from smtpproxy.metrics import Metrics
from smtpproxy.pipeline import Pipeline
from smtpproxy.policy.submission import Submission
from smtpproxy.ratelimit.limiter import RateLimiter
from smtpproxy.stages import Check
from smtpproxy.submission.bruteforce import AuthGuard
from smtpproxy.submission.dkimsign import DkimSigner
from smtpproxy.submission.passwd import PasswdFile
from smtpproxy.submission.senderlogin import SenderLogin


def outbound_checks(checks: list[Check]) -> list[Check]:
    """The inbound checks minus sender authentication: SPF, DKIM, ARC and DMARC judge mail *to* us.

    What stays: rate limits (with per-user ``auth_user`` keys), relay (which
    lets authenticated clients through), limits, and the rules (``auth.user``).
    """
    inbound_only = {"spf", "dkim", "arc", "dmarc", "authres"}
    return [c for c in checks if c.name not in inbound_only]


class SubmissionSetupError(ValueError):
    """A submission setup this version cannot serve; the text names the key."""


def build_submission(
    config: Config, checks: list[Check], limiter: RateLimiter, metrics: Metrics
) -> Submission | None:
    """The Submission of ``config``, None without a ``submission`` section.

    Raises ``ValueError`` subclasses (PasswdError, SenderLoginError) and
    ``SignerError`` naming the file at fault; the CLI reports them and exits 2.
    """
    section = config.submission
    if section is None:
        return None
    if section.auth == "backend":
        # Relaying AUTH to the backend on a connection of the session's own is not built yet;
        # refusing to start beats a submission port where every AUTH fails.
        raise SubmissionSetupError(
            "submission.auth: 'backend' is not supported by this version yet; "
            "set submission.auth: {passwd_file: PATH}"
        )
    pipeline = Pipeline(
        outbound_checks(checks), metrics, timeout=config.check_timeout, on_error=config.on_check_error
    )
    passwd = PasswdFile(config.path(section.auth.passwd_file))
    sender_login = SenderLogin(config.path(section.sender_login)) if section.sender_login else None
    signer = DkimSigner(config.dkim_sign, config.path) if config.dkim_sign else None
    return Submission(
        section,
        pipeline,
        AuthGuard(limiter, section.brute_force),
        metrics,
        passwd=passwd,
        sender_login=sender_login,
        signer=signer,
    )
