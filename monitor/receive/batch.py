"""Decode and validate one ActivationBatch: raw bytes in, torch rows and label arrays out.

Every way a batch can be wrong maps to one drop reason, so a malformed batch is rejected and
counted (`featurewatch_batches_dropped_total{reason}`) and the stream goes on. A fault in one
request's labels (a position no sequence reaches) drops only that request's rows
(`featurewatch_tokens_dropped_total{reason}`): the other requests of the batch lose nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.protocol import pb

TORCH_DTYPES = {pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16, pb.BFLOAT16: torch.bfloat16}
# Positions at or above this are refused whatever the configuration says: dedupe keeps `position + 1`
# in int64, so anything near 2**63 would overflow (and no sequence is that long).
POSITION_CEILING = 1 << 62

warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class BatchRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class DecodedBatch:
    step: int
    layers: list[int]
    activations: torch.Tensor  # [L, N, d] in the wire dtype (a view on the message bytes)
    request_ids: list[str]
    token_request: np.ndarray  # [N] int64
    positions: np.ndarray  # [N] int64
    generated: np.ndarray  # [N] bool
    captured_unix_s: float
    nbytes: int
    dropped: dict[str, int] = field(default_factory=dict)  # token rows left out, by reason
    token_ids: np.ndarray | None = None  # [N] int64 vocabulary ids; None from plugins that send none

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])


def decode_batch(msg: pb.ActivationBatch, d_model: int, allowed_layers: set[int], max_bytes: int, max_tokens: int,
                 data=None, max_position: int = POSITION_CEILING) -> DecodedBatch:
    """Validate shapes, dtypes, labels and limits; raise BatchRejected(reason, detail).

    ``data``: the activation bytes when the receiver kept them out of the message
    (``monitor.receive.wire``); otherwise they are read from ``msg.activations.data``.
    ``max_position``: a request with a token at or beyond it loses its rows of this batch
    (``dropped["position"]``); the batch is rejected only if nothing else is left."""
    t = msg.activations
    if data is None:
        data = t.data  # each access to a protobuf bytes field copies it: read it once
    nbytes = len(data)
    if nbytes > max_bytes:
        raise BatchRejected("oversized", f"{nbytes} bytes > limit {max_bytes}")
    if t.dtype not in TORCH_DTYPES:
        raise BatchRejected("dtype", f"unsupported dtype {t.dtype}")
    shape = list(t.shape)
    if len(shape) != 3:
        raise BatchRejected("malformed", f"activations must be [layers, tokens, d], got shape {shape}")
    n_layers, n_tokens, d = shape
    if d != d_model:
        raise BatchRejected("malformed", f"d={d} but the plugin said d_model={d_model}")
    if n_layers != len(msg.layers) or n_layers == 0 or len(set(msg.layers)) != n_layers:
        raise BatchRejected("malformed", f"{n_layers} activation slices for layers {list(msg.layers)[:16]}")
    if n_tokens > max_tokens:
        raise BatchRejected("oversized", f"{n_tokens} tokens > limit {max_tokens}")
    dtype = TORCH_DTYPES[t.dtype]
    expected = n_layers * n_tokens * d * torch.empty((), dtype=dtype).element_size()
    if nbytes != expected:
        raise BatchRejected("malformed", f"{nbytes} data bytes, shape {shape} needs {expected}")
    unknown = sorted(set(msg.layers) - allowed_layers)
    if unknown:
        raise BatchRejected("unknown_layer", f"layers {unknown} not in the tap plan {sorted(allowed_layers)}")
    if not (len(msg.token_request_index) == len(msg.positions) == len(msg.is_generated) == n_tokens):
        raise BatchRejected("malformed", f"label lengths {len(msg.token_request_index)}/{len(msg.positions)}/"
                            f"{len(msg.is_generated)} differ from {n_tokens} tokens")
    if len(msg.token_ids) not in (0, n_tokens):
        raise BatchRejected("malformed", f"{len(msg.token_ids)} token ids for {n_tokens} tokens")
    if len(msg.request_ids) > max_tokens:  # a step never has more requests than tokens it may carry
        raise BatchRejected("oversized", f"{len(msg.request_ids)} request ids > limit {max_tokens}")
    token_request = np.array(msg.token_request_index, dtype=np.int64)
    if n_tokens and (token_request.max() >= len(msg.request_ids)):
        raise BatchRejected("malformed", f"token request index {int(token_request.max())} >= {len(msg.request_ids)} request ids")
    positions = np.array(msg.positions, dtype=np.uint64)  # uint64 on the wire: convert only once in range
    generated = np.array(msg.is_generated, dtype=bool)
    token_ids = np.array(msg.token_ids, dtype=np.int64) if len(msg.token_ids) else None
    activations = torch.frombuffer(data, dtype=dtype).view(n_layers, n_tokens, d) if nbytes else torch.empty(shape, dtype=dtype)
    dropped = {}
    limit = min(max_position, POSITION_CEILING)
    if n_tokens and positions.max() >= limit:
        # This request's labels cannot be trusted: leave out all its rows of the batch (its dedupe and
        # windows never see them); the other requests' rows go on as if it had not been there.
        bad = np.isin(token_request, np.unique(token_request[positions >= limit]))
        if bad.all():
            raise BatchRejected("position", f"position {int(positions.max())} >= limit {limit}")
        keep = np.nonzero(~bad)[0]
        dropped["position"] = int(bad.sum())
        activations = activations[:, torch.from_numpy(keep)]  # a copy, only on this rare path
        token_request, positions, generated = token_request[keep], positions[keep], generated[keep]
        token_ids = None if token_ids is None else token_ids[keep]
    return DecodedBatch(
        step=msg.step, layers=list(msg.layers), activations=activations, request_ids=list(msg.request_ids),
        token_request=token_request, positions=positions.astype(np.int64), generated=generated,
        captured_unix_s=msg.captured_unix_s, nbytes=nbytes, dropped=dropped, token_ids=token_ids,
    )


@dataclass
class BatchGroup:
    """Consecutive batches of one stream with the same layers, evaluated as one: the pipeline's
    per-batch work (dedupe, windows, exports) is paid once for the group. Labels are merged (one
    index per request id, token order kept); activations stay per batch, never copied."""

    parts: list[DecodedBatch]
    layers: list[int]
    request_ids: list[str]
    token_request: np.ndarray
    positions: np.ndarray
    generated: np.ndarray
    captured_unix_s: float  # the oldest part's
    token_ids: np.ndarray | None = None  # merged like the labels; None unless every part has them

    @classmethod
    def of(cls, parts: list[DecodedBatch]) -> "BatchGroup":
        ids: dict[str, int] = {}
        remapped = []
        for b in parts:
            index = np.array([ids.setdefault(rid, len(ids)) for rid in b.request_ids], dtype=np.int64)
            remapped.append(index[b.token_request] if len(index) else b.token_request)
        captured = [b.captured_unix_s for b in parts if b.captured_unix_s]
        return cls(parts=parts, layers=parts[0].layers, request_ids=list(ids), token_request=np.concatenate(remapped),
                   positions=np.concatenate([b.positions for b in parts]),
                   generated=np.concatenate([b.generated for b in parts]),
                   captured_unix_s=min(captured) if captured else 0.0,
                   token_ids=None if any(b.token_ids is None for b in parts)
                   else np.concatenate([b.token_ids for b in parts]))
