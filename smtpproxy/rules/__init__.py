"""The filter-rule engine: YAML rule files compiled once, evaluated per stage, reloaded live.

Public entry points: :func:`build_rules_engine` (the App's engine, whose
``check`` is registered in the pipeline), :class:`RulesEngine`,
:class:`RulesError`, :func:`load_ruleset` and :func:`run_rule_tests`.
"""

from smtpproxy.rules.check import RulesCheck
from smtpproxy.rules.engine import RulesEngine, build_rules_engine
from smtpproxy.rules.loader import Problem, RulesError
from smtpproxy.rules.ruleset import Rule, RuleSet, load_ruleset

__all__ = [
    "Problem",
    "Rule",
    "RuleSet",
    "RulesCheck",
    "RulesEngine",
    "RulesError",
    "build_rules_engine",
    "load_ruleset",
]
