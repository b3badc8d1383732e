"""Rule files: every error located as file:line:col with the rule name; CLI check/test; schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from citypulse.cli import app
from citypulse.registry import load_registry
from rules import RuleFileError, load_rules, rules_json_schema
from rules._expr import FUNCTIONS

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = ROOT / "deploy" / "registry.example.yaml"

BAD = """\
groups:
  - name: g
    rules:
      - name: BadSyntax
        expr: pressure < < 2
      - name: BadDuration
        expr: pressure < 2
        for: 5 minutes
      - name: UnknownKey
        expr: pressure < 2
        fro: 5m
      - name: UnknownFunction
        expr: "median(pressure, 5m) > 3"
      - name: Hostile
        expr: __import__('os').system('id') > 0
      - name: BadWindow
        expr: >-
          avg(pressure, 10) > 2
"""


def test_every_error_is_collected_with_place_and_rule(tmp_path: Path) -> None:
    """One pass reports all problems, each as file:line:col: rule "Name": message."""
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    with pytest.raises(RuleFileError) as exc:
        load_rules(f)
    got = [str(p) for p in exc.value.problems]
    assert got == [
        f"{f}:5:26: rule \"BadSyntax\": unexpected '<'",
        f"{f}:8:14: rule \"BadDuration\": for: Value error, bad duration '5 minutes': "
        "use e.g. 30s, 5m, 1h30m, 7d",
        f"{f}:11:14: rule \"UnknownKey\": unknown key 'fro'",
        f"{f}:13:16: rule \"UnknownFunction\": unknown function 'median' (known: "
        + ", ".join(sorted(FUNCTIONS))
        + ")",
        f'{f}:15:31: rule "Hostile": attribute access is not allowed',
        f'{f}:18:25: rule "BadWindow": the window must be a duration such as 10m, 1h or 90s',
    ]


def test_duplicate_names_and_structure_errors(tmp_path: Path) -> None:
    """Alert names are unique across files; non-rule keys are refused."""
    (tmp_path / "a.yaml").write_text(
        "groups:\n  - name: g\n    rules:\n      - {name: A, expr: p > 1}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "groups:\n  - name: h\n    limit: 10\n    rules:\n      - {name: A, expr: p > 1}\n"
    )
    with pytest.raises(RuleFileError) as exc:
        load_rules(tmp_path)
    msgs = [p.message for p in exc.value.problems]
    assert "unknown key 'limit' in group" in msgs
    assert any('rule "A": name already used' in m for m in msgs)


def test_group_interval_applies_to_group_rules_and_bad_values_are_located(
    tmp_path: Path,
) -> None:
    """A rule group's ``interval`` reaches its group_by rules only; a bad one is an error at
    its line."""
    f = tmp_path / "i.yaml"
    f.write_text(
        "groups:\n  - name: g\n    interval: 2s\n    rules:\n"
        "      - {name: Each, expr: pressure < 1}\n"
        "      - {name: All, group_by: district, expr: group.avg(pressure) < 1}\n"
    )
    by_name = {r.name: r.interval_ms for r in load_rules(f)}
    assert by_name == {"Each": 0, "All": 2000}
    f.write_text(
        "groups:\n  - name: g\n    interval: 2 seconds\n    rules:\n"
        "      - {name: All, group_by: district, expr: group.avg(pressure) < 1}\n"
    )
    with pytest.raises(RuleFileError) as exc:
        load_rules(f)
    assert [str(p) for p in exc.value.problems] == [
        f"{f}:3:15: interval: Value error, bad duration '2 seconds': use e.g. 30s, 5m, 1h30m, 7d"
    ]


def test_selector_matching_nothing_is_a_warning(tmp_path: Path) -> None:
    """Selectors that match no sensor are warnings (exit 0), not errors."""
    f = tmp_path / "w.yaml"
    f.write_text(
        "groups:\n  - name: g\n    rules:\n"
        "      - {name: A, select: {silo: water, district: atlantis}, expr: pressure < 1}\n"
        "      - {name: B, select: {silo: air}, expr: pressure < 1}\n"
        "      - {name: C, group_by: district, expr: 'group.max(flow, silo=air) > 1'}\n"
    )
    rs = load_rules(f, load_registry(REGISTRY))
    msgs = [w.message for w in rs.warnings]
    assert msgs[0] == 'rule "A": warning: select matches no sensor in the registry'
    assert "no selected sensor has all the metrics ['pressure']" in msgs[1]
    assert "matches no sensor in the registry" in msgs[2]
    assert len(msgs) == 3


def test_cli_check_examples_and_errors(tmp_path: Path) -> None:
    """`citypulse rules check` passes on the examples and exits 1 listing every error."""
    runner = CliRunner()
    ok = runner.invoke(
        app, ["rules", "check", str(ROOT / "rules" / "examples"), "--registry", str(REGISTRY)]
    )
    assert ok.exit_code == 0, ok.output
    assert "rule(s) ok" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    res = runner.invoke(app, ["rules", "check", str(bad), "--registry", str(REGISTRY)])
    assert res.exit_code == 1
    assert "6 error(s)" in res.output


def test_cli_check_reads_the_maintenance_file_as_windows_not_rules(tmp_path: Path) -> None:
    """A rules directory's maintenance.yaml is checked as windows, with located errors."""
    runner = CliRunner()
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "water.yaml").write_text((ROOT / "rules" / "examples" / "water.yaml").read_text())
    (rules_dir / "maintenance.yaml").write_text(
        (ROOT / "rules" / "examples" / "maintenance.yaml").read_text()
    )
    args = ["rules", "check", str(rules_dir), "--registry", str(REGISTRY)]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "1 file(s)" in ok.output
    (rules_dir / "maintenance.yaml").write_text(
        "windows:\n  - name: w\n    start: '25:00'\n    duration: 1h\n    match: {}\n"
    )
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert f"{rules_dir / 'maintenance.yaml'}:3:" in res.output


def test_cli_test_examples_pass_and_failures_show_a_diff(tmp_path: Path) -> None:
    """`citypulse rules test` passes the shipped tests and fails with a readable diff."""
    runner = CliRunner()
    files = sorted(str(p) for p in (ROOT / "rules" / "examples" / "tests").glob("*.yaml"))
    assert len(files) >= 5
    res = runner.invoke(app, ["rules", "test", *files])
    assert res.exit_code == 0, res.output
    assert "SUCCESS" in res.output
    broken = tmp_path / "broken.test.yaml"
    broken.write_text(
        f"rule_files: [{ROOT / 'rules' / 'examples' / 'waste.yaml'}]\n"
        f"registry: {REGISTRY}\n"
        "tests:\n"
        "  - name: wrong expectation\n"
        "    input_series:\n"
        "      - {sensor: wst-north-001, metric: fill_level, values: '95x10'}\n"
        "    alert_rule_test:\n"
        "      - eval_time: 8m\n"
        "        alertname: WasteBinFull\n"
        "        exp_alerts:\n"
        "          - {severity: critical}\n"
    )
    res = runner.invoke(app, ["rules", "test", str(broken)])
    assert res.exit_code == 1
    assert "expected (not found): state=firing severity=critical" in res.output
    assert "+ got (unexpected):     state=firing severity=info" in res.output


@pytest.mark.parametrize(
    ("values", "expanded"),
    [
        ("1 2 _ 3", [1, 2, None, 3]),
        ("1x3", [1, 1, 1, 1]),
        ("1+2x3", [1, 3, 5, 7]),
        ("5-1x2", [5, 4, 3]),
        ("_x3 4", [None, None, None, 4]),
    ],
)
def test_series_notation(values: str, expanded: list[float | None]) -> None:
    """The compact input notation expands like promtool's."""
    from rules._testing import expand_values

    assert expand_values(values) == expanded


def test_committed_json_schema_is_current() -> None:
    """schemas/rules.schema.json is generated from the models (run `citypulse rules schema`)."""
    committed = json.loads((ROOT / "schemas" / "rules.schema.json").read_text())
    assert committed == rules_json_schema()
    assert "keep_firing_for" in json.dumps(committed)
