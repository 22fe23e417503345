"""Bounded YAML loading for documents that arrive from operators or over the admin API.

`yaml.safe_load` runs no code, but it happily composes a 400-byte alias bomb into a structure that
expands to billions of nodes once anything walks it, recurses once per nesting level (a 5000-deep
document is a RecursionError), keeps the last of two equal mapping keys, and lets `datetime()` or
`int()` raise plain ValueErrors. This loader checks every bound while the document is *composed*
(before any Python object is built) and turns every failure into one short `YamlRefused`.

Bounds (a rules file with thousands of rules stays well inside them):
- ``MAX_BYTES`` 1 MiB of UTF-8: parsing stays under ~1 s.
- ``MAX_DEPTH`` 32 nested collections: a rule needs 7.
- ``MAX_NODES`` 200,000 nodes counted with every alias expanded: what pydantic will walk.
- ``MAX_ALIASES`` 1,000 alias uses.
"""

from __future__ import annotations

import reprlib

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_NODES = 200_000
MAX_ALIASES = 1_000
MERGE_TAG = "tag:yaml.org,2002:merge"

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlevel = 2
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 4


def shorten(value, limit: int = 80) -> str:
    """A repr that never walks or prints more than ~`limit` characters of a value."""
    text = _short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class YamlRefused(ValueError):
    """A document that cannot be used; `path` is where in it (dotted, `a.b[0]`) or ""."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        super().__init__(clip(message))


if getattr(yaml, "__with_libyaml__", False):  # libyaml's parser, our Python composer: ~3x faster
    from yaml._yaml import CParser as _Parser

    class _Base(yaml.composer.Composer, _Parser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        def __init__(self, stream) -> None:
            _Parser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
else:  # pragma: no cover - PyYAML built without libyaml
    _Base = yaml.SafeLoader


def _line(node_or_event) -> int:
    return node_or_event.start_mark.line + 1


class _BoundedLoader(_Base):
    """SafeLoader whose composer counts depth, aliases and expanded nodes, and refuses duplicate keys."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}  # id(node) -> node count with aliases expanded
        self._path: list[str] = []

    def _where(self) -> str:
        return "".join(self._path).lstrip(".")

    def compose_node(self, parent, index):
        pushed = False
        if isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
            self._path.append(f".{clip(index.value, 60)}")
            pushed = True
        elif isinstance(parent, SequenceNode) and isinstance(index, int):
            self._path.append(f"[{index}]")
            pushed = True
        try:
            if self.check_event(AliasEvent):
                event = self.peek_event()
                node = super().compose_node(parent, index)
                self._aliases += 1
                if self._aliases > MAX_ALIASES:
                    raise YamlRefused(f"more than {MAX_ALIASES} alias uses (line {_line(event)})", self._where())
                if id(node) not in self._sizes:
                    raise YamlRefused(f"recursive alias *{clip(event.anchor, 40)} (line {_line(event)})", self._where())
                return node
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise YamlRefused(f"nesting deeper than {MAX_DEPTH} (line {_line(self.peek_event())})", self._where())
            node = super().compose_node(parent, index)
            self._depth -= 1
            self._count(node)
            return node
        finally:
            if pushed:
                self._path.pop()

    def _count(self, node) -> None:
        sizes = self._sizes
        if isinstance(node, SequenceNode):
            size = 1 + sum(sizes[id(child)] for child in node.value)
        elif isinstance(node, MappingNode):
            size = 1 + sum(sizes[id(k)] + sizes[id(v)] for k, v in node.value)
            self._check_duplicates(node)
        else:
            size = 1
        if size > MAX_NODES:
            raise YamlRefused(f"aliases expand the document past {MAX_NODES} nodes (limit {MAX_NODES}, "
                              f"at line {_line(node)})", self._where())
        sizes[id(node)] = size

    def _check_duplicates(self, node: MappingNode) -> None:
        seen: dict[tuple, ScalarNode] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == MERGE_TAG:
                continue  # merged keys (`<<: *defaults`) may be overridden: that is what merging is for
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                path = ".".join(p for p in (self._where(), clip(key.value, 60)) if p)
                raise YamlRefused(f"duplicate key {clip(key.value, 60)!r} at line {_line(key)} "
                                  f"(first at line {_line(first)})", path)


def decode_utf8(data: bytes) -> str:
    """Strict UTF-8 (a BOM is allowed); the refusal says which byte and where."""
    if len(data) > MAX_BYTES:
        raise YamlRefused(f"document is {len(data)} bytes, limit {MAX_BYTES}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YamlRefused(f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}") from None


def load_yaml(text: str):
    """One YAML document as Python objects, every bound checked; raise YamlRefused otherwise."""
    size = len(text.encode("utf-8", "surrogatepass")) if len(text) * 4 > MAX_BYTES else len(text)
    if size > MAX_BYTES:
        raise YamlRefused(f"document is {size} bytes, limit {MAX_BYTES}")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except YamlRefused:
        raise
    except yaml.YAMLError as exc:
        raise YamlRefused(f"not valid YAML: {exc}") from None
    except Exception as exc:
        # PyYAML's constructors raise plain errors: ValueError for a timestamp datetime() refuses or an
        # int over 4300 digits, IndexError for `!!float ''`...: all of them are the document's fault
        raise YamlRefused(f"not valid YAML: {type(exc).__name__}: {exc}") from None
    finally:
        loader.dispose()
