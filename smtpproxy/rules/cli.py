"""The ``smtpproxy rules check`` and ``smtpproxy rules test`` commands (wired by smtpproxy/cli.py).

Exit codes: 0 fine, 1 a rule test failed, 2 the rules (or their tests) do not load.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from smtpproxy.config import Config
from smtpproxy.rules.loader import RulesError
from smtpproxy.rules.ruleset import load_ruleset
from smtpproxy.rules.testing import compile_tests, run_rule_tests


def cmd_rules_check(rules_dir: Path, config: Config, out: TextIO | None = None) -> int:
    """Validate every rule file, list and inline test; print ``FILE:LINE: rule NAME: problem`` lines."""
    out = out or sys.stdout
    try:
        ruleset = load_ruleset(rules_dir)
    except RulesError as err:
        for problem in err.problems:
            print(f"{rules_dir}/{problem.render()}", file=out)
        print(f"{len(err.problems)} problem(s) in {rules_dir}", file=out)
        return 2
    problems = [p for block in ruleset.tests for p in compile_tests(block)[1]]
    for problem in problems:
        print(f"{rules_dir}/{problem.render()}", file=out)
    if problems:
        print(f"{len(problems)} problem(s) in the tests of {rules_dir}", file=out)
        return 2
    stages = ", ".join(f"{s.value} {len(r)}" for s, r in ruleset.by_stage.items() if r)
    print(
        f"ok: {len(ruleset)} rules ({stages or 'none'}), {len(ruleset.lists)} lists, "
        f"{len(ruleset.files)} files in {rules_dir}",
        file=out,
    )
    return 0


def cmd_rules_test(rules_dir: Path, config: Config, out: TextIO | None = None) -> int:
    """Run the inline tests of every rule file; print a pass/fail line per test."""
    out = out or sys.stdout
    try:
        report = run_rule_tests(rules_dir, None, config.scores)
    except RulesError as err:
        for problem in err.problems:
            print(f"{rules_dir}/{problem.render()}", file=out)
        return 2
    print(report.render(), file=out)
    return 0 if report.passed else 1
