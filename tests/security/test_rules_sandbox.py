"""Hostile rule files: expressions and annotation templates cannot reach Python."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from citypulse.cli import app
from rules import RuleFileError, load_rules

RULE = """\
groups:
  - name: g
    rules:
      - name: Hostile
        select: {{silo: water}}
        expr: pressure < 2
        annotations:
          summary: "{template}"
"""

HOSTILE_TEMPLATES = [
    "{{ __import__('os').system('id') }}",
    "{{ open('/etc/passwd') }}",
    "{{ pressure.__class__ }}",
    "{{ ().__class__.__bases__ }}",
    "{{ $__class__ }}",
    "{{ $sensor.__class__ }}",
    "{{ eval('1') }}",
    "{{ [c for c in ()] }}",
    "{{ lambda: 1 }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_annotation_template_is_refused(tmp_path: Path, template: str) -> None:
    """Python syntax, builtins and dunder access inside ``{{ }}`` are load errors, located."""
    f = tmp_path / "hostile.yaml"
    f.write_text(RULE.format(template=template.replace('"', '\\"')))
    with pytest.raises(RuleFileError) as exc:
        load_rules(f)
    assert all(str(p).startswith(f"{f}:8:") for p in exc.value.problems), exc.value.problems
    assert 'rule "Hostile"' in str(exc.value.problems[0])


def test_format_string_tricks_stay_literal_text(tmp_path: Path) -> None:
    """Single braces are not a format string: ``{value.__class__}`` is kept as plain text,
    never interpreted (templates are parsed into text/field/expression parts at load time)."""
    f = tmp_path / "literal.yaml"
    f.write_text(RULE.format(template="{value.__class__} {0.__globals__} %(x)s"))
    (rule,) = load_rules(f).rules
    parts = rule.annotations["summary"]
    assert parts == (("text", "{value.__class__} {0.__globals__} %(x)s", None),)


def test_rules_check_cli_refuses_a_hostile_file(tmp_path: Path) -> None:
    """``citypulse rules check`` exits non-zero and names the place of the hostile expression."""
    f = tmp_path / "hostile.yaml"
    f.write_text(
        RULE.format(template="ok").replace("expr: pressure < 2", "expr: pressure.__class__ > 1")
    )
    res = CliRunner().invoke(app, ["rules", "check", str(f)])
    assert res.exit_code != 0
    assert "attribute access is not allowed" in res.output
    assert f"{f}:6:" in res.output
