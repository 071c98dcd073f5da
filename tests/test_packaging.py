"""What an installed proxy ships: packaged rules, the generated sample config, init, --version, quiet stderr."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from smtpproxy.config import PACKAGED_RULES, Config, build_config, load_config
from smtpproxy.config.sample import MEANINGS, keys
from tests.test_cli_process import run_cli


def uncomment(text: str) -> str:
    """Every commented setting of a sample config made active (prose lines stay comments)."""
    return "\n".join(re.sub(r"^#(?! \S)", "", line) for line in text.splitlines())


def test_every_key_of_the_model_has_a_one_line_meaning() -> None:
    assert set(MEANINGS) == set(keys(Config))
    assert all("\n" not in text and text for text in MEANINGS.values())


def test_packaged_rules_are_the_default_and_rules_path_says_where(tmp_path: Path) -> None:
    assert sorted(p.name for p in PACKAGED_RULES.glob("*.yaml"))[0] == "00-allowlist.yaml"
    assert (PACKAGED_RULES / "lists" / "executable_extensions.txt").is_file()
    result = run_cli("rules", "path", cwd=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, str(PACKAGED_RULES))
    cfg = tmp_path / "smtpproxy.yaml"
    cfg.write_text("rules: null\n")
    assert run_cli("rules", "path", "--config", str(cfg)).stdout.strip() == "none (rules: null)"
    assert run_cli("rules", "check", cwd=tmp_path).stdout.startswith("ok: 10 rules")


def test_a_config_naming_only_the_port_keeps_every_other_default(tmp_path: Path) -> None:
    """The issue's regression: relay_domains, rules and the maildir must not move under a config file."""
    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "smtpproxy.yaml"
    cfg.write_text("listen: 127.0.0.1:2600\n")
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("config", "--config", str(cfg), cwd=work)
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["listen"] == "127.0.0.1:2600"
    assert settings["relay_domains"] == ["example.org", "localhost"]
    assert settings["rules"] == str(PACKAGED_RULES)
    # The default maildir is the working folder's (WorkingDirectory= of the unit), not /etc's.
    assert settings["backend"] == f"maildir:{work / 'var' / 'mail'}"
    without = json.loads(run_cli("config", cwd=work).stdout)
    assert {k: v for k, v in settings.items() if k != "listen"} == {
        k: v for k, v in without.items() if k != "listen"
    }


def test_config_prints_paths_resolved_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "myrules").mkdir()
    cfg = tmp_path / "smtpproxy.yaml"
    cfg.write_text("rules: myrules\nbackend: maildir:mail\nscores: {quarantine_to: 'maildir:q'}\n")
    settings = json.loads(run_cli("config", "--config", str(cfg), cwd=Path("/")).stdout)
    assert settings["rules"] == str(tmp_path / "myrules")
    assert settings["backend"] == f"maildir:{tmp_path / 'mail'}"
    assert settings["scores"]["quarantine_to"] == f"maildir:{tmp_path / 'q'}"


def test_init_writes_a_sample_config_of_the_defaults_rules_and_a_dropin(tmp_path: Path) -> None:
    folder = tmp_path / "etc" / "smtpproxy"
    result = run_cli("init", str(folder), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sample = folder / "smtpproxy.yaml"
    text = sample.read_text()
    for key in keys(Config):
        if key != "rules":
            assert re.search(rf"^#\s*{re.escape(key.rsplit('.', 1)[-1])}: ", text, re.M), key
    # As written: the defaults, with the rules folder init copied next to it.
    config = load_config(sample)
    assert config.rules_path == folder / "rules"
    assert sorted(p.name for p in (folder / "rules").glob("*.yaml")) == sorted(
        p.name for p in PACKAGED_RULES.glob("*.yaml")
    )
    assert run_cli("rules", "test", "--config", str(sample)).returncode == 0
    # Every commented default made active loads and equals the model's defaults.
    active = folder / "active.yaml"
    (folder / "var").mkdir()  # a maildir written in the file resolves next to it
    active.write_text(uncomment(text))
    loaded = load_config(active).model_dump(exclude={"base_dir", "backend", "rules"})
    assert loaded == Config().model_dump(exclude={"base_dir", "backend", "rules"})
    dropin = (folder / "smtpproxy.service.d" / "config.conf").read_text()
    assert "[Service]\nExecStart=\nExecStart=/" in dropin
    assert dropin.rstrip().endswith(f"serve --config {sample}")


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "smtpproxy.yaml").write_text("listen: 127.0.0.1:2600\n")
    result = run_cli("init", str(tmp_path))
    assert result.returncode == 1
    assert f"error: refusing to overwrite {tmp_path / 'smtpproxy.yaml'}" in result.stderr
    assert (tmp_path / "smtpproxy.yaml").read_text() == "listen: 127.0.0.1:2600\n"
    assert not (tmp_path / "rules").exists()


def test_version_names_the_mail_libraries() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    from smtpproxy import __version__

    assert lines[0] == f"smtpproxy {__version__}"
    names = {line.split()[0] for line in lines}
    assert {"aiosmtpd", "aiosmtplib", "pyspf", "dkimpy", "dnspython", "google-re2"} <= names
    assert not any(line.endswith("not installed") for line in lines)


@pytest.mark.parametrize("where", ["rule", "list"])
def test_a_bad_regex_is_reported_by_us_without_re2_noise_on_stderr(tmp_path: Path, where: str) -> None:
    folder = tmp_path / "rules"
    (folder / "lists").mkdir(parents=True)
    if where == "rule":
        (folder / "a.yaml").write_text(
            "rules:\n  - name: x\n    if: {subject: {regex: '(?<=a)b'}}\n    then: reject\n"
        )
    else:
        (folder / "lists" / "bad.txt").write_text("/(?<=a)b/\n")
        (folder / "a.yaml").write_text(
            "rules:\n  - name: x\n    if: {subject: {in_list: bad}}\n    then: reject\n"
        )
    result = run_cli("rules", "check", str(folder))
    assert result.returncode == 2
    assert "absl" not in result.stderr and "re2.cc" not in result.stderr, result.stderr
    assert "(?<=" in result.stdout + result.stderr


def test_defaults_with_a_missing_default_rules_override_stay_errors(tmp_path: Path) -> None:
    """`rules: null` still means no rules; a named folder that is missing is still an error."""
    assert build_config({"rules": None}).rules_path is None
    with pytest.raises(Exception, match="rules: expected an existing folder"):
        build_config({"rules": "nope"}, base_dir=tmp_path)
