"""Request sets and label files: which recorded requests a command compares, trains or scores on.

A set is written as one string:

- ``labels:FILE.jsonl`` — requests whose label in the file is positive (``true``, ``1``, a
  non-empty concept name or list of names other than none/benign/negative/false);
  ``labels:FILE.jsonl#VALUE`` — requests labelled ``VALUE`` (or whose list holds it);
- ``meta:KEY=VALUE`` or just ``KEY=VALUE`` — requests whose metadata (vllm_xargs) has it;
- ``rule:NAME`` — requests on which the live sidecar's rule NAME fired (recorded ``rules_fired``);
- ``regex:PATTERN`` — requests whose generated text matches (needs ``--tokenizer``);
- ``not:<set>`` — every other recorded request; ``all`` — every recorded request.

Label files are JSONL, one ``{"api_request_id": ..., "label": ...}`` per line; an id matches a
recorded request's API id as recorded (``cmpl-abc``) or without vLLM's ``cmpl-``/``chatcmpl-``
prefix (the client's ``X-Request-Id``). An id that matches no recorded request is an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monitor.author.errors import AuthorError, clip

NEGATIVE_WORDS = {"", "0", "false", "no", "none", "benign", "negative", "neutral"}
MAX_LABEL_BYTES = 256 << 20


@dataclass
class Entry:
    """What the set logic needs of one recorded request (no activations)."""

    request_id: str
    api_request_id: str
    metadata: dict
    rules_fired: list
    fired_positions: list
    positions: np.ndarray
    token_ids: np.ndarray
    generated: np.ndarray
    text: str | None = None  # generated text, filled by Catalog.texts
    token_spans: object = None  # text.Text of the generated tokens


@dataclass
class Catalog:
    """Every complete request of a recording, in recording order, keyed by internal id."""

    entries: list[Entry]
    source: str = "<recording>"
    _detok: object = None
    by_id: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {e.request_id: e for e in self.entries}

    @classmethod
    def of(cls, requests, source: str = "<recording>") -> "Catalog":
        """From objects with the RecordedRequest attributes (the reader's, or test doubles)."""
        entries = [Entry(r.request_id, r.api_request_id, dict(r.metadata or {}), list(r.rules_fired or []),
                         list(r.fired_positions or []), np.asarray(r.positions), np.asarray(r.token_ids),
                         np.asarray(r.generated, dtype=bool)) for r in requests]
        return cls(entries, source)

    @property
    def ids(self) -> list[str]:
        return [e.request_id for e in self.entries]

    def texts(self, detokenizer) -> None:
        """Decode every request's generated tokens once (regexes and per-token labels read them)."""
        if detokenizer is None:
            raise AuthorError("a regex over the generated text needs --tokenizer (the served model's tokenizer)")
        for e in self.entries:
            if e.token_spans is not None:
                continue
            ids = e.token_ids[e.generated]
            if (ids < 0).any():
                raise AuthorError(f"{self.source}: request {clip(e.api_request_id or e.request_id)} has no token ids "
                                  f"(the plugin that recorded it sent none): its text cannot be matched")
            e.token_spans = detokenizer.spans(ids)
            e.text = e.token_spans.text

    def match_api_ids(self, ids: list[str], file: str) -> dict[str, list[Entry]]:
        """``api id -> requests``; AuthorError naming ``file`` for ids that match no request."""
        index: dict[str, list[Entry]] = {}
        for e in self.entries:
            for key in {e.api_request_id, _strip_prefix(e.api_request_id)}:
                if key:
                    index.setdefault(key, []).append(e)
        out, unknown = {}, []
        for i in ids:
            found = index.get(i)
            if found is None:
                unknown.append(i)
            else:
                out[i] = found
        if unknown:
            shown = ", ".join(repr(clip(u, 40)) for u in unknown[:3])
            raise AuthorError(f"{file}: {len(unknown)} api_request_id(s) match no request in {self.source} "
                              f"(e.g. {shown}); the recording has {len(self.entries)} requests")
        return out


def _strip_prefix(api_id: str) -> str:
    for prefix in ("chatcmpl-", "cmpl-"):
        if api_id.startswith(prefix):
            return api_id[len(prefix):]
    return api_id


# ------------------------------------------------------------------------------ label files


def read_labels(path: str | Path) -> dict[str, object]:
    """``api_request_id -> label`` from a JSONL label file; AuthorError naming the file and line."""
    path = Path(path)
    try:
        if not path.is_file():
            raise AuthorError(f"{path}: no such label file")
        if path.stat().st_size > MAX_LABEL_BYTES:
            raise AuthorError(f"{path}: label file larger than {MAX_LABEL_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AuthorError(f"{path}: label file is not UTF-8") from None
    except OSError as exc:
        raise AuthorError(f"{path}: cannot read label file: {exc.strerror or exc}") from None
    labels: dict[str, object] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise AuthorError(f"{path}: line {n} is not JSON: {clip(line)}") from None
        if not isinstance(row, dict) or not isinstance(row.get("api_request_id"), str) or "label" not in row:
            raise AuthorError(f"{path}: line {n} needs {{\"api_request_id\": str, \"label\": ...}}, got {clip(line)}")
        label = row["label"]
        if not _label_ok(label):
            raise AuthorError(f"{path}: line {n}: label must be a boolean, 0/1, a name or a list of names, got {clip(json.dumps(label))}")
        labels[row["api_request_id"]] = label
    if not labels:
        raise AuthorError(f"{path}: label file has no labels")
    return labels


def _label_ok(label) -> bool:
    if isinstance(label, bool) or label in (0, 1):
        return True
    if isinstance(label, str):
        return len(label) <= 128
    return isinstance(label, list) and len(label) <= 64 and all(isinstance(x, str) and len(x) <= 128 for x in label)


def label_names(label) -> set[str]:
    """The concept names a label gives (empty for a negative one); True/1 gives {""} (positive, unnamed)."""
    if isinstance(label, bool) or isinstance(label, int):
        return {""} if label else set()
    items = [label] if isinstance(label, str) else label
    return {x for x in items if x.strip().lower() not in NEGATIVE_WORDS}


def labelled(catalog: Catalog, path: str | Path) -> dict[str, set[str]]:
    """``request_id -> concept names`` for every request the label file names (unknown ids refused)."""
    labels = read_labels(path)
    matched = catalog.match_api_ids(list(labels), str(path))
    out: dict[str, set[str]] = {}
    for api_id, entries in matched.items():
        for e in entries:
            out.setdefault(e.request_id, set()).update(label_names(labels[api_id]))
    return out


# ------------------------------------------------------------------------------ sets


def resolve(spec: str, catalog: Catalog, detokenizer=None) -> set[str]:
    """The internal request ids of a set written as described in the module docstring."""
    spec = spec.strip()
    if spec == "all":
        return set(catalog.ids)
    if spec.startswith("not:"):
        return set(catalog.ids) - resolve(spec[4:], catalog, detokenizer)
    if spec.startswith("labels:"):
        path, _, value = spec[7:].partition("#")
        names = labelled(catalog, path)
        if value:
            return {rid for rid, got in names.items() if value in got}
        return {rid for rid, got in names.items() if got}
    if spec.startswith("rule:"):
        name = spec[5:]
        return {e.request_id for e in catalog.entries if name in e.rules_fired}
    if spec.startswith("regex:"):
        rx = compile_regex(spec[6:], "regex set")
        catalog.texts(detokenizer)
        return {e.request_id for e in catalog.entries if rx.search(e.text)}
    body = spec[5:] if spec.startswith("meta:") else spec
    key, eq, value = body.partition("=")
    if eq and key:
        return {e.request_id for e in catalog.entries if str(e.metadata.get(key)) == value}
    raise AuthorError(f"cannot read the request set {clip(spec)!r}: use labels:FILE[#VALUE], KEY=VALUE, "
                      f"rule:NAME, regex:PATTERN, not:<set> or all")


def compile_regex(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise AuthorError(f"{what}: not a valid regular expression {clip(pattern)!r}: {exc}") from None
