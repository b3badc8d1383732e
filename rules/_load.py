"""Reading rule files: validate, compile, check against the registry, collect every problem."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

from citypulse.durations import Duration
from citypulse.registry import Registry, Sensor
from citypulse.yamlsrc import Located, Locator, YamlSourceError, parse_located
from rules._expr import Compiled, ExprError, Scope, Type, compile_expr
from rules._model import GROUP_FIELDS, Action, RuleSpec, Selector
from rules._select import SensorLookup

TEMPLATE_FIELDS = frozenset(
    {"sensor", "vendor", "silo", "district", "asset", "group", "group_by", "rule", "severity"}
)
"""``{{ $field }}`` names an annotation template can use (plus ``$labels.<name>``)."""
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_DURATION: TypeAdapter[Any] = TypeAdapter(Duration)


class RuleError(Exception):
    """Base exception of the ``rules`` package."""


class RuleFileError(RuleError, YamlSourceError):
    """Rule files have errors; ``problems`` lists each as ``file:line:col: rule "Name": msg``."""


@dataclass(frozen=True, slots=True)
class Level:
    """A compiled severity level (levels are ordered lowest first)."""

    name: str
    cond: Compiled
    for_ms: int


TemplatePart = tuple[Literal["text", "field", "expr"], str, Compiled | None]


@dataclass(frozen=True, eq=False)
class Rule:
    """A validated, compiled rule.

    Attributes:
        name: alert name (unique in a rule set).
        group: rule group name.
        file: the file it came from.
        version: content hash of that file (``AlertEvent.rule_version``).
        digest: hash of this rule's own definition: hot reload keeps the state of a rule
            whose name and digest are unchanged.
        scope: ``"sensor"`` (state per sensor) or ``"group"`` (state per group value).
        metrics: metrics a sensor must have to be covered (sensor rules).
        window_s: longest window the rule reads, seconds.
        interval_ms: evaluation interval of a group rule, event-time ms (its rule group's
            ``interval``); 0: evaluated on every batch of a member.
    """

    name: str
    group: str
    file: str
    version: str
    digest: str
    spec: RuleSpec
    scope: Scope
    levels: tuple[Level, ...]
    clear: Compiled | None
    keep_firing_for_ms: int
    labels: dict[str, str]
    annotations: dict[str, tuple[TemplatePart, ...]]
    action_value: Compiled | None
    metrics: frozenset[str]
    windows_s: dict[str, float]
    uses_stale: bool
    window_s: float | None
    interval_ms: int = 0

    @property
    def select(self) -> Selector:
        return self.spec.select

    @property
    def group_by(self) -> str | None:
        return self.spec.group_by

    @property
    def action(self) -> Action | None:
        return self.spec.action


@dataclass(frozen=True)
class RuleSet:
    """Compiled rules from one or more files, in file order.

    Attributes:
        rules: the rules.
        warnings: non-fatal problems (e.g. selectors that match no sensor).
        files: the files read.
    """

    rules: tuple[Rule, ...]
    warnings: tuple[Located, ...] = ()
    files: tuple[str, ...] = ()
    by_name: dict[str, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {r.name: r for r in self.rules})

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Any:
        return iter(self.rules)


MAINTENANCE_FILE = "maintenance.yaml"
"""Maintenance windows live beside the rules (``rules.runtime.maintenance``), not as rules."""


def rule_files(paths: Path | str | Iterable[Path | str]) -> list[Path]:
    """The rule files named by ``paths``: files as given, directories' ``*.yaml``/``*.yml``.

    A directory's :data:`MAINTENANCE_FILE` and hidden files (editors' swap files) are left out.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(
                sorted(
                    q
                    for q in p.iterdir()
                    if q.suffix in (".yaml", ".yml")
                    and q.is_file()
                    and q.name != MAINTENANCE_FILE
                    and not q.name.startswith(".")
                )
            )
        else:
            out.append(p)
    return out


def load_rules(
    paths: Path | str | Iterable[Path | str], registry: Registry | None = None
) -> RuleSet:
    """Load, validate and compile rule files.

    Args:
        paths: a file, a directory (its ``*.yaml``/``*.yml``, not recursive) or several.
        registry: when given, selectors are checked against it (warnings, not errors).

    Raises:
        RuleFileError: listing every error of every file.
    """
    ruleset, errors = check_rules(paths, registry)
    if errors or ruleset is None:
        raise RuleFileError(errors)
    return ruleset


def check_rules(
    paths: Path | str | Iterable[Path | str], registry: Registry | None = None
) -> tuple[RuleSet | None, list[Located]]:
    """Like :func:`load_rules` but return ``(ruleset or None, errors)``; warnings are in the set."""
    errors: list[Located] = []
    warnings: list[Located] = []
    rules: list[Rule] = []
    files = rule_files(paths)
    if not files:
        errors.append(Located(str(paths), 1, 1, "no rule files found"))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(Located(str(path), 1, 1, f"cannot read: {exc}"))
            continue
        got, errs, warns = parse_rules_text(text, str(path), registry)
        rules.extend(got)
        errors.extend(errs)
        warnings.extend(warns)
    seen: dict[str, Rule] = {}
    for rule in rules:
        if rule.name in seen:
            errors.append(
                Located(
                    rule.file,
                    1,
                    1,
                    f'rule "{rule.name}": name already used in {seen[rule.name].file} '
                    f"(alert names must be unique)",
                )
            )
        seen[rule.name] = rule
    if errors:
        return None, errors
    return RuleSet(tuple(rules), tuple(warnings), tuple(str(f) for f in files)), []


def parse_rules_text(
    text: str, file: str, registry: Registry | None = None
) -> tuple[list[Rule], list[Located], list[Located]]:
    """Validate and compile one rule file's text: ``(rules, errors, warnings)``."""
    try:
        data, locator = parse_located(text, file)
    except YamlSourceError as exc:
        return [], exc.problems, []
    version = hashlib.sha256(text.encode()).hexdigest()[:12]
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        return [], [locator.at([], "expected a mapping with a 'groups' list")], []
    errors: list[Located] = []
    warnings: list[Located] = []
    rules: list[Rule] = []
    lookup = None if registry is None else SensorLookup.of(registry)
    for key in data:
        if key != "groups":
            errors.append(locator.at([key], f"unknown key {key!r} (expected 'groups')"))
    for gi, group in enumerate(data["groups"]):
        where: list[str | int] = ["groups", gi]
        if not isinstance(group, dict):
            errors.append(locator.at(where, "a group must be a mapping with name and rules"))
            continue
        for key in group:
            if key not in ("name", "interval", "rules"):
                errors.append(locator.at([*where, key], f"unknown key {key!r} in group"))
        gname = group.get("name")
        if not isinstance(gname, str) or not gname:
            errors.append(locator.at(where, "group needs a 'name'"))
            gname = f"groups[{gi}]"
        interval_ms = 0
        if "interval" in group:
            try:
                interval_ms = round(
                    _DURATION.validate_python(group["interval"]).total_seconds() * 1000
                )
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"]
                errors.append(locator.at([*where, "interval"], f"interval: {msg}"))
            if interval_ms < 0:
                errors.append(locator.at([*where, "interval"], "interval: must not be negative"))
        if not isinstance(group.get("rules"), list):
            errors.append(locator.at(where, f"group {gname!r} needs a 'rules' list"))
            continue
        for ri, raw in enumerate(group["rules"]):
            path: list[str | int] = [*where, "rules", ri]
            name = raw.get("name") if isinstance(raw, dict) else None
            builder = _RuleBuilder(locator, path, str(name or f"rules[{ri}]"), lookup)
            rule = builder.build(raw, gname, file, version)
            if rule is not None and rule.scope == "group" and interval_ms:
                rule = replace(rule, interval_ms=interval_ms)
            errors.extend(builder.errors)
            warnings.extend(builder.warnings)
            if rule is not None:
                rules.append(rule)
    return rules, errors, warnings


class _RuleBuilder:
    def __init__(
        self, locator: Locator, path: list[str | int], name: str, lookup: SensorLookup | None
    ) -> None:
        self.locator = locator
        self.path = path
        self.name = name
        self.lookup = lookup
        self.errors: list[Located] = []
        self.warnings: list[Located] = []

    def problem(self, sub: Sequence[str | int], message: str, col_offset: int = 0) -> Located:
        line, col = self.locator.find([*self.path, *sub])
        node = self.locator.node([*self.path, *sub])
        if col_offset and node is not None:
            line, col = _expr_position(node, col_offset, self.locator.lines)
        return Located(self.locator.file, line, col, f'rule "{self.name}": {message}')

    def error(self, sub: Sequence[str | int], message: str, col_offset: int = 0) -> None:
        self.errors.append(self.problem(sub, message, col_offset))

    def warn(self, sub: Sequence[str | int], message: str) -> None:
        self.warnings.append(self.problem(sub, f"warning: {message}"))

    def expr(
        self, sub: Sequence[str | int], text: str, scope: Scope, want: Type
    ) -> Compiled | None:
        try:
            return compile_expr(text, scope=scope, want=want)
        except ExprError as exc:
            self.error(sub, exc.message, exc.col)
            return None

    def build(self, raw: Any, group: str, file: str, version: str) -> Rule | None:
        if not isinstance(raw, dict):
            self.error([], "a rule must be a mapping")
            return None
        try:
            spec = RuleSpec.model_validate(raw)
        except ValidationError as exc:
            for err in exc.errors():
                loc = [p for p in err["loc"] if isinstance(p, str | int)]
                # pydantic reports union members separately; name the field once.
                loc = [p for p in loc if p not in ("str", "list[str]", "list[Level]")]
                if err["type"] == "extra_forbidden":
                    msg = f"unknown key {loc[-1]!r}" if loc else "unknown key"
                else:
                    msg = f"{'.'.join(str(p) for p in loc)}: {err['msg']}"
                self.error(loc, msg)
            return None
        scope: Scope = "group" if spec.group_by else "sensor"
        if spec.group_by and not (
            spec.group_by in GROUP_FIELDS or spec.group_by.startswith("labels.")
        ):
            self.error(
                ["group_by"],
                f"cannot group by {spec.group_by!r}: use one of {', '.join(GROUP_FIELDS)} "
                "or labels.<key>",
            )
        levels: list[Level] = []
        if isinstance(spec.severity, list):
            if spec.expr is not None:
                self.error(["expr"], "give either expr or severity levels with their own expr")
            if not spec.severity:
                self.error(["severity"], "severity levels list is empty")
            names = [lv.level for lv in spec.severity]
            if len(set(names)) != len(names):
                self.error(["severity"], "severity level names must be unique")
            for i, lv in enumerate(spec.severity):
                c = self.expr(["severity", i, "expr"], lv.expr, scope, Type.BOOL)
                if c is not None:
                    ms = round(lv.for_.total_seconds() * 1000)
                    levels.append(Level(lv.level, c, ms))
        elif spec.expr is None:
            self.error([], "needs an expr (or severity levels with their own expr)")
        else:
            c = self.expr(["expr"], spec.expr, scope, Type.BOOL)
            if c is not None:
                levels.append(Level(spec.severity, c, round(spec.for_.total_seconds() * 1000)))
        if isinstance(spec.severity, list) and spec.for_.total_seconds():
            self.error(["for"], "with severity levels, put 'for' on each level")
        clear = None if spec.clear is None else self.expr(["clear"], spec.clear, scope, Type.BOOL)
        for key in spec.labels:
            if key in ("alertname", "sensor", "group"):
                self.error(["labels", key], f"label {key!r} is set by the engine")
        action_value = None
        if spec.action is not None:
            action_value = self.action(spec, scope)
        annotations = {
            key: self.template(["annotations", key], text, scope)
            for key, text in spec.annotations.items()
        }
        if self.errors:
            return None
        compiled = [lv.cond for lv in levels]
        if clear is not None:
            compiled.append(clear)
        if action_value is not None:
            compiled.append(action_value)
        metrics: frozenset[str] = frozenset().union(*(c.metrics for c in compiled))
        windows: dict[str, float] = {}
        extras = [p[2] for parts in annotations.values() for p in parts if p[2] is not None]
        for c in [*compiled, *extras]:
            for m, w in c.windows_s.items():
                windows[m] = max(windows.get(m, 0.0), w)
        conds = [lv.cond for lv in levels] + ([clear] if clear else [])
        window_s = max((w for c in conds for w in c.windows_s.values()), default=0.0) or None
        digest_src = json.dumps(
            [group, spec.model_dump(mode="json", by_alias=True)], sort_keys=True
        )
        rule = Rule(
            name=spec.name,
            group=group,
            file=file,
            version=version,
            digest=hashlib.sha256(digest_src.encode()).hexdigest()[:12],
            spec=spec,
            scope=scope,
            levels=tuple(levels),
            clear=clear,
            keep_firing_for_ms=round(spec.keep_firing_for.total_seconds() * 1000),
            labels=dict(spec.labels),
            annotations=annotations,
            action_value=action_value,
            metrics=metrics,
            windows_s=windows,
            uses_stale=any(c.uses_stale for c in compiled),
            window_s=window_s,
        )
        if self.lookup is not None:
            self.check_registry(rule, compiled)
        return rule

    def action(self, spec: RuleSpec, scope: Scope) -> Compiled | None:
        action = spec.action
        assert action is not None
        cmd = action.command
        if isinstance(spec.severity, list):
            self.error(["severity"], "an action rule has one condition (expr), not levels")
        g = action.guardrails
        if g.min is not None and g.max is not None and g.min > g.max:
            self.error(["action", "guardrails"], f"guardrails min {g.min} is above max {g.max}")
        if scope == "sensor" and cmd.select is not None:
            self.error(
                ["action", "command", "select"],
                "command select needs a group rule (group_by); a sensor rule commands its "
                "own sensor or an explicit 'sensor'",
            )
        if scope == "group" and cmd.select is None and cmd.sensor is None:
            self.error(["action", "command"], "a group rule must name targets: select or sensor")
        return self.expr(["action", "command", "value"], cmd.value, scope, Type.NUM)

    def template(self, sub: list[str | int], text: str, scope: Scope) -> tuple[TemplatePart, ...]:
        parts: list[TemplatePart] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(text):
            if m.start() > pos:
                parts.append(("text", text[pos : m.start()], None))
            inner = m.group(1).strip()
            if inner.startswith("$"):
                name = inner[1:]
                if name not in TEMPLATE_FIELDS and not name.startswith("labels."):
                    fields = ", ".join(f"${f}" for f in sorted(TEMPLATE_FIELDS))
                    self.error(
                        sub, f"template: unknown field {inner!r} (known: {fields}, $labels.<name>)"
                    )
                parts.append(("field", name, None))
            else:
                try:
                    c = compile_expr(inner, scope=scope, want=None)
                except ExprError as exc:
                    self.error(sub, f"template {{{{ {inner} }}}}: {exc.message}")
                else:
                    parts.append(("expr", inner, c))
            pos = m.end()
        if pos < len(text):
            parts.append(("text", text[pos:], None))
        return tuple(parts)

    def check_registry(self, rule: Rule, compiled: list[Compiled]) -> None:
        assert self.lookup is not None
        sensors = self.lookup.matching(rule.spec.select)
        if not sensors:
            self.warn(
                ["select"] if "select" in rule.spec.model_fields_set else [],
                "select matches no sensor in the registry",
            )
            return
        covered = [s for s in sensors if rule.metrics <= s.metrics.keys()]
        if not covered:
            missing = sorted(rule.metrics - set().union(*(s.metrics.keys() for s in sensors)))
            self.warn(
                ["expr"] if rule.spec.expr else [],
                f"no selected sensor has all the metrics {sorted(rule.metrics)}"
                + (f" (nobody has {missing})" if missing else ""),
            )
        for c in compiled:
            for selector, metrics, col in c.selectors:
                if not any(group_member(s, selector, metrics) for s in covered):
                    desc = ", ".join(f"{k}={v}" for k, v in selector.items()) or "no selector"
                    self.warn(
                        [],
                        f"group function at col {col} ({desc}, metrics {sorted(metrics)}) "
                        "matches no sensor in the registry",
                    )
        action = rule.spec.action
        if action is not None:
            cmd = action.command
            targets = [
                s
                for s in self.lookup.sensors
                if s.actuator
                and (cmd.sensor is None or s.id == cmd.sensor)
                and (cmd.select is None or cmd.select.matches(s))
            ]
            if not targets and (cmd.sensor or cmd.select):
                self.warn(["action", "command"], "command matches no actuator in the registry")


def group_member(s: Sensor, selector: dict[str, str], metrics: frozenset[str]) -> bool:
    """Whether ``s`` is read by a ``group.*`` call with this selector and these metrics."""
    if not metrics <= s.metrics.keys():
        return False
    for key, want in selector.items():
        if key == "sensor":
            have: str | None = s.id
        elif key in ("silo", "district", "asset", "vendor"):
            have = str(getattr(s, key))
        else:
            have = s.labels.get(key)
        if have != want:
            return False
    return True


def _expr_position(node: yaml.Node, col: int, lines: Sequence[str]) -> tuple[int, int]:
    """File line and column of column ``col`` of an expression held in the scalar ``node``."""
    line, start = node.start_mark.line + 1, node.start_mark.column + 1
    style = getattr(node, "style", None)
    if style in ('"', "'"):
        return line, start + col
    if style in ("|", ">"):
        # Block scalars start on the next line, indented; map the offset through the lines.
        value = str(node.value)
        before = value[: col - 1]
        nl = before.count("\n")
        indent = _block_indent(node, lines)
        return line + 1 + nl, indent + len(before) - (before.rfind("\n") + 1) + 1
    return line, start + col - 1


def _block_indent(node: yaml.Node, lines: Sequence[str]) -> int:
    # A block scalar's text starts on the line after its indicator (| or >).
    first = node.start_mark.line + 1
    if first >= len(lines):
        return 0
    return len(lines[first]) - len(lines[first].lstrip(" "))
