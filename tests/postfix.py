"""A private, real Postfix instance on loopback: the backend most operators run behind us.

``PostfixInstance`` is a plain class (bench scripts can use it); ``postfix_backend``
is the pytest fixture. Each instance lives in its own temporary folder:

- ``conf/``: ``main.cf`` and ``master.cf`` written here. ``postfix -c conf``
  reads nothing else, so instances never share settings with the machine's
  ``/etc/postfix`` (which need not even have a ``main.cf``).
- ``queue/`` (``queue_directory``) and ``data/`` (``data_directory``): the
  master's pid file lives in the queue, its lock in data, so two instances in
  different folders (and ports) run side by side. ``alternate_config_directories``
  / ``multi_instance_*`` are not needed: they only matter for the set-gid
  commands (``postdrop``, ``postqueue``) a non-root user runs, and we neither
  submit through ``sendmail`` nor list the queue.
- ``mail/``: virtual maildirs for ``example.org``.
- ``maillog``: Postfix's own log (``maillog_file`` through the ``postlog``
  service, Postfix 3.4+), since no syslog daemon runs here;
  ``maillog_file_prefixes`` must allow our folder (the default is ``/var``).
  Postfix writes fatal errors to stderr only on a terminal (else to syslog,
  absent here): run the command under ``script -qc`` to read one.

Why the settings are there:

- ``mail_owner = postfix`` and ``setgid_group = postdrop``: the Debian owners;
  ``postfix check`` (run by ``postfix start``) creates the queue folders with
  them and refuses to start when they do not exist. The master takes its lock
  in ``data_directory`` as ``postfix``, so that folder is chowned to it.
- Every service has ``chroot = n``: a chroot would need a copy of the
  libraries and ``/etc`` files inside our temporary queue folder.
- The folder is made world-traversable (0755): the daemons run as ``postfix``
  and must reach the queue below it (``tempfile.mkdtemp`` makes 0700).
- ``mynetworks = 127.0.0.0/8``: Debian's default, trusting loopback, which is
  what makes routed local parts (``%``, ``!``) dangerous behind a proxy.
- ``smtpd_authorized_xclient_hosts`` / ``..._xforward_hosts = 127.0.0.1``:
  where the proxy connects from. A client impersonated with XCLIENT from
  127.0.0.2 is *not* authorised, so Postfix stops offering XCLIENT on that
  connection (the behaviour the backend pool must respect).
- ``virtual_mailbox_*`` with ``inline:{...}`` maps (no ``postmap``) and a static
  uid/gid (``nobody``); unknown users are refused at RCPT (``550 5.1.1 ...
  User unknown``, ``smtpd_reject_unlisted_recipient`` is the default).
- ``mydestination =`` and ``local_transport``/``default_transport``/
  ``relay_transport = error:...``: nothing is ever delivered locally or
  relayed. Postfix refuses a recipient that resolves to the ``error``
  transport already at RCPT, with our text: ``550 5.7.1 <x@elsewhere.example>:
  Recipient address rejected: test instance: relaying disabled`` in the reply
  and the log means Postfix *would* have relayed it (for a client it does not
  trust, the refusal is ``Relay access denied`` instead). ``notify_classes =``
  keeps the postmaster notices from going anywhere.
- ``smtpd_client_connection_*_limit = 0``: tests open many connections from
  127/8 in bursts; anvil must not throttle them.

``postfix start`` takes 2-3 s here (it runs ``postfix check`` first) and a
reload about 2 s, so the fixture starts one instance per test module and
reloads only after a test that changed settings (``configure``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

POSTFIX = "/usr/sbin/postfix"

USERS = ("user", "postmaster", "other", "third")
DOMAIN = "example.org"

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet n - n - - smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Delivered:
    """One message in a virtual maildir."""

    mailbox: str  # user@example.org
    path: Path
    content: bytes


class PostfixInstance:
    """One private Postfix: ``start()``, ``stop()``, ``reload()``, its log and its mailboxes."""

    def __init__(self, root: Path | None = None, port: int | None = None) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="smtpproxy-postfix-"))
        self.root.chmod(0o755)
        self.port = port or free_port()
        self.conf = self.root / "conf"
        self.queue = self.root / "queue"
        self.data = self.root / "data"
        self.mail = self.root / "mail"
        self.log_path = self.root / "maillog"
        self.extra: dict[str, str] = {}
        nobody = pwd.getpwnam("nobody")
        self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
        for folder in (self.conf, self.queue, self.data, self.mail):
            folder.mkdir(parents=True, exist_ok=True)
        os.chown(self.mail, self.uid, self.gid)
        owner = pwd.getpwnam("postfix")
        os.chown(self.data, owner.pw_uid, owner.pw_gid)
        self._write_config()

    # -- configuration ---------------------------------------------------------

    def settings(self) -> dict[str, str]:
        """The main.cf of this instance (the test's own settings last)."""
        mailboxes = ", ".join(f"{u}@{DOMAIN}={DOMAIN}/{u}/" for u in USERS)
        base = {
            "compatibility_level": "3.6",
            "config_directory": str(self.conf),
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.root),
            "myhostname": "backend.postfix.test",
            "mydomain": "postfix.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_authorized_xclient_hosts": "127.0.0.1",
            "smtpd_authorized_xforward_hosts": "127.0.0.1",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": str(self.mail),
            "virtual_mailbox_maps": f"inline:{{ {mailboxes} }}",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            "virtual_minimum_uid": str(min(self.uid, 100)),
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery disabled in this test instance",
            "default_transport": "error:5.7.1 test instance: relaying disabled",
            "relay_transport": "error:5.7.1 test instance: relaying disabled",
            "notify_classes": "",
            "smtputf8_enable": "yes",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP test-postfix",
            # A test's client lingers in no queue: deliver at once, retry quickly.
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
            # Our tests send from 127/8 in bursts; anvil must not refuse them.
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_connection_count_limit": "0",
        }
        return {**base, **self.extra}

    def _write_config(self) -> None:
        lines = [f"{key} = {value}" for key, value in self.settings().items()]
        (self.conf / "main.cf").write_text("\n".join(lines) + "\n")
        (self.conf / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))

    def configure(self, **settings: str) -> None:
        """Add or change main.cf settings (takes effect on ``start()`` or ``reload()``)."""
        self.extra.update(settings)
        self._write_config()

    def reset_config(self) -> None:
        """Back to the base settings (written now; effective at the next start/reload)."""
        self.extra.clear()
        self._write_config()

    # -- lifecycle -------------------------------------------------------------

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.conf), *args], capture_output=True, text=True, check=check, timeout=60
        )

    @property
    def running(self) -> bool:
        """True when this instance's master process is alive."""
        return self._postfix("status", check=False).returncode == 0

    def start(self, timeout: float = 30.0) -> None:
        """Start the master and wait until smtpd answers with its banner."""
        self._write_config()
        result = self._postfix("start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stdout}{result.stderr}\n{self.maillog()}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"postfix did not answer on port {self.port}:\n{self.maillog()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the master (its smtpd processes with it) and wait until it is gone."""
        if not self.running:
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() > deadline:
                self._postfix("abort", check=False)
                break
            time.sleep(0.05)
        self._wait_port_free(deadline)

    def _wait_port_free(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
            except OSError:
                return
            time.sleep(0.05)

    def reload(self) -> None:
        """``postfix reload``: new main.cf for new processes; running smtpd finish their sessions."""
        self._write_config()
        self._postfix("reload")

    def cleanup(self) -> None:
        """Stop and remove the folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- what happened -----------------------------------------------------------

    def maillog(self) -> str:
        """The whole log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """A position in the log; ``maillog(since=...)``-style reads start there."""
        return len(self.maillog())

    def maillog_since(self, mark: int) -> str:
        """The log written after ``mark`` (from ``log_mark()``)."""
        return self.maillog()[mark:]

    def wait_for_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the log (after ``since``), waiting for it to appear."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.maillog(), since)
            if m is not None:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the Postfix log:\n{self.maillog()[since:]}")
            time.sleep(0.05)

    def delivered(self, mailbox: str | None = None) -> list[Delivered]:
        """Messages in the maildirs (``new/``), oldest first; only ``mailbox`` when given."""
        found: list[Delivered] = []
        for user in USERS:
            address = f"{user}@{DOMAIN}"
            if mailbox is not None and address != mailbox:
                continue
            new = self.mail / DOMAIN / user / "new"
            if new.is_dir():
                found += [Delivered(address, p, p.read_bytes()) for p in new.iterdir()]
        return sorted(found, key=lambda d: (d.path.stat().st_mtime_ns, d.path.name))

    def wait_delivered(self, count: int, timeout: float = 15.0) -> list[Delivered]:
        """Wait until at least ``count`` messages are in the maildirs (delivery is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.delivered()
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} messages delivered:\n{self.maillog()}")
            time.sleep(0.05)

    def clear_mailboxes(self) -> None:
        """Remove every delivered message."""
        for d in self.delivered():
            with contextlib.suppress(FileNotFoundError):
                d.path.unlink()


def postfix_available() -> bool:
    """Whether Debian's postfix is installed here."""
    return Path(POSTFIX).exists()


@pytest.fixture(scope="module")
def postfix_instance() -> Iterator[PostfixInstance]:
    """A running private Postfix for the test module (its settings reset by ``postfix_backend``)."""
    if not postfix_available():
        pytest.skip(f"{POSTFIX} is not installed (CI installs the postfix package)")
    instance = PostfixInstance()
    try:
        instance.start()
        yield instance
    finally:
        instance.cleanup()


@pytest.fixture
def postfix_backend(postfix_instance: PostfixInstance) -> Iterator[PostfixInstance]:
    """The module's Postfix, running, with the base settings and empty mailboxes for this test."""
    pf = postfix_instance
    if pf.extra or not pf.running:
        pf.reset_config()
        if pf.running:
            pf.reload()
        else:
            pf.start()
    pf.clear_mailboxes()
    yield pf
    if not pf.running:
        pf.start()
