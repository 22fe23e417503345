"""Write new ``above`` values into a rules file, leaving every other byte as it was.

The file is composed with PyYAML (after the bounded loader has validated it) only to find where
each rule's ``above`` value lies; those characters are replaced, so comments, key order, quoting
and policies stay as the author wrote them.
"""

from __future__ import annotations

import yaml

from monitor.author.errors import AuthorError
from monitor.evaluate.rules import parse_rules


def format_number(value: float) -> str:
    """Shortest round-tripping text that YAML 1.1 (PyYAML) reads as a float (needs a dot)."""
    s = repr(float(value))
    if "e" in s and "." not in s:
        mantissa, _, exponent = s.partition("e")
        s = f"{mantissa}.0e{exponent}"
    if "e" in s and s.split("e")[1][0] not in "+-":
        s = s.replace("e", "e+")
    return s


def set_thresholds(text: str, thresholds: dict[str, float], file: str) -> str:
    """``text`` with each named rule's ``above`` replaced; AuthorError if one cannot be edited in place."""
    parse_rules(text, file)  # bounded and validated before PyYAML composes it
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    edits: list[tuple[int, int, str]] = []
    found: set[str] = set()
    rules = _value(root, "rules")
    for item in rules.value if isinstance(rules, yaml.SequenceNode) else []:
        if not isinstance(item, yaml.MappingNode):
            continue
        name = _value(item, "name")
        name = name.value if isinstance(name, yaml.ScalarNode) else None
        if name not in thresholds:
            continue
        above = _value(item, "above")
        if not isinstance(above, yaml.ScalarNode) or above.start_mark.index >= above.end_mark.index or any(
                n is above for n in _anchored(root, above)):
            raise AuthorError(f"{file}: rule {name!r}: its `above` is not a plain value in the rule (an alias "
                              f"or merged key); set it to {format_number(thresholds[name])} by hand")
        edits.append((above.start_mark.index, above.end_mark.index, format_number(thresholds[name])))
        found.add(name)
    missing = sorted(set(thresholds) - found)
    if missing:
        raise AuthorError(f"{file}: no rule {missing[0]!r} with an `above` to set")
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    parse_rules(text, file)
    return text


def _value(node, key: str):
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return v
    return None


def _anchored(root, target) -> list:
    """Nodes reached more than once (an anchor used by an alias): editing their text edits all uses."""
    seen: dict[int, int] = {}
    stack = [root]
    out = []
    while stack:
        node = stack.pop()
        seen[id(node)] = seen.get(id(node), 0) + 1
        if seen[id(node)] > 1:
            if node is target:
                out.append(node)
            continue
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend((k, v))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return out
