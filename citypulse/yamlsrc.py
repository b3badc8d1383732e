"""YAML that remembers where each value came from, for ``file:line:col`` errors.

``load_located(path)`` returns the plain data (dicts, lists, scalars) and a :class:`Locator`
that maps a path of keys and indices (as pydantic's ``loc`` gives it) to the line and column
of that node. Duplicate keys are errors, as unknown keys are elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


@dataclass(frozen=True, slots=True)
class Located:
    """A message tied to a place in a file (1-based line and column)."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class YamlSourceError(Exception):
    """A file that could not be read or parsed; ``problems`` holds every located message."""

    def __init__(self, problems: Sequence[Located]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Locator:
    """Finds the line and column of a node given its path from the document root."""

    def __init__(self, file: str, root: yaml.Node | None, text: str = "") -> None:
        self.file = file
        self._root = root
        self.lines = text.splitlines()
        """The source lines, for callers that place errors inside a scalar."""

    def node(self, path: Sequence[str | int]) -> yaml.Node | None:
        """The node at exactly ``path``, or None when the path does not exist."""
        node = self._root
        for step in path:
            if node is None:
                return None
            node = _child(node, step)
        return node

    def find(self, path: Sequence[str | int]) -> tuple[int, int]:
        """Deepest node on ``path`` that exists; (1, 1) for an empty document."""
        node = self._root
        if node is None:
            return (1, 1)
        for step in path:
            child = _child(node, step)
            if child is None:
                break
            node = child
        return (node.start_mark.line + 1, node.start_mark.column + 1)

    def at(self, path: Sequence[str | int], message: str) -> Located:
        line, col = self.find(path)
        return Located(self.file, line, col, message)

    def pydantic_errors(
        self, exc: ValidationError, prefix: Sequence[str | int] = ()
    ) -> list[Located]:
        """One located message per pydantic error, ``path`` shown in the message."""
        out = []
        for err in exc.errors():
            loc = [*prefix, *(p for p in err["loc"] if isinstance(p, str | int))]
            where = ".".join(str(p) for p in loc) or "(document)"
            out.append(self.at(loc, f"{where}: {err['msg']}"))
        return out


def _child(node: yaml.Node, step: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(step):
                found: yaml.Node = value
                return found
    elif (
        isinstance(node, yaml.SequenceNode)
        and isinstance(step, int)
        and 0 <= step < len(node.value)
    ):
        item: yaml.Node = node.value[step]
        return item
    return None


# libyaml's parser when PyYAML was built with it (10-20x faster on a city-sized registry).
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen[key] = key_node
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def parse_located(text: str, file: str) -> tuple[Any, Locator]:
    """Parse YAML text; raise :class:`YamlSourceError` with the place of a syntax error."""
    # One parse: the node tree gives the places, the same tree is then constructed into data.
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise YamlSourceError([Located(file, line, col, str(exc.problem or exc))]) from exc
    except yaml.YAMLError as exc:
        raise YamlSourceError([Located(file, 1, 1, str(exc))]) from exc
    finally:
        loader.dispose()
    return data, Locator(file, root, text)


def load_located(path: Path) -> tuple[Any, Locator]:
    """Read and parse a YAML file (see :func:`parse_located`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlSourceError([Located(str(path), 1, 1, f"cannot read: {exc}")]) from exc
    return parse_located(text, str(path))
