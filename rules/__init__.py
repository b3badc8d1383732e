"""Alert and optimisation rules: file format, expression language, and the rule engine.

Public API (everything else is private and may change)::

    from rules import RuleSet, load_rules, RuleFileError, RuleEngine
    ruleset = load_rules("rules/examples", registry)
    engine = RuleEngine(ruleset, registry)
    effects = engine.process(batch)          # list[AlertEvent | CommandEvent]
    effects = engine.advance(now_ms)

See ``rules/README.md`` for the rule language.
"""

from rules._engine import RuleEngine, RuleEvalError, RuleStateError, fingerprint
from rules._expr import ExprError, compile_expr
from rules._load import Rule, RuleError, RuleFileError, RuleSet, check_rules, load_rules
from rules._model import RuleFileSpec, rules_json_schema, write_rules_schema

__all__ = [
    "ExprError",
    "Rule",
    "RuleEngine",
    "RuleError",
    "RuleEvalError",
    "RuleFileError",
    "RuleFileSpec",
    "RuleSet",
    "RuleStateError",
    "check_rules",
    "compile_expr",
    "fingerprint",
    "load_rules",
    "rules_json_schema",
    "write_rules_schema",
]
