"""Load YAML safely and remember where every key came from.

Refuses explicit tags (`!!python/object`, `!foo`, even `!!str`) and documents
with many aliases (a "billion laughs" expansion), and returns, beside the
data, the line of every key path so errors can point into the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SpecError

MAX_ALIASES = 50
MAX_BYTES = 1_000_000

Lines = dict[tuple, int]


def load_yaml(path: Path) -> tuple[Any, Lines]:
    """Parse `path`; return (data, {key path tuple: 1-based line})."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_BYTES:
        raise SpecError(f"{path}: {len(raw)} bytes; a spec is expected to be under {MAX_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return loads_yaml(text, str(path))


def loads_yaml(text: str, source: str) -> tuple[Any, Lines]:
    try:
        aliases = 0
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, yaml.TagToken):
                raise SpecError(f"{source}:{token.start_mark.line + 1}: YAML tags are not allowed "
                                f"(found {token.value[0]}{token.value[1]}); write plain values")
            if isinstance(token, yaml.AliasToken):
                aliases += 1
                if aliases > MAX_ALIASES:
                    raise SpecError(f"{source}:{token.start_mark.line + 1}: more than {MAX_ALIASES} YAML "
                                    f"aliases; refusing a document that could expand without bound")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise SpecError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: invalid YAML: {exc}") from None
    if node is None:
        return None, {}
    lines: Lines = {}
    _record_lines(node, (), lines)
    data = yaml.SafeLoader(text).get_single_data()
    return data, lines


def _record_lines(node: yaml.Node, path: tuple, lines: Lines) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _record_lines(value_node, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, path + (index,), lines)


def line_of(lines: Lines, path: tuple) -> int | None:
    """The line of the longest prefix of `path` that the file spells out."""
    for end in range(len(path), -1, -1):
        key = tuple(path[:end])
        if key in lines:
            return lines[key]
    return None
