"""The rules folder must exist: a vanished folder keeps the old rules; ``rules: null`` means none."""

from __future__ import annotations

import shutil
from pathlib import Path

from smtpproxy.config import build_config
from smtpproxy.metrics import Metrics
from smtpproxy.rules.engine import build_rules_engine

RULE = "- name: no-spam-subject\n  stage: data\n  if: {subject: {contains: SPAM}}\n  then: reject\n"


def test_a_rules_folder_that_vanishes_keeps_the_old_rules(tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "10-subject.yaml").write_text(RULE)
    metrics = Metrics(process=False)
    engine = build_rules_engine(build_config({"rules": str(folder)}), None, metrics)
    assert len(engine.current) == 1
    shutil.rmtree(folder)
    assert engine.changed()
    assert engine.reload() is False
    assert len(engine.current) == 1
    assert engine.last_error is not None
    assert "no such folder" in engine.last_error.problems[0].render()
    assert metrics.registry.get_sample_value("smtpproxy_rules_loaded") == 1


def test_rules_null_loads_nothing_and_reloads_nothing(tmp_path: Path) -> None:
    engine = build_rules_engine(build_config({"rules": None}), None, Metrics(process=False))
    assert len(engine.current) == 0
    assert engine.reload() is True
    assert not engine.changed()
