"""In-memory recorded requests (the reader's RecordedRequest attributes) for the cores' unit tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class FakeRequest:
    request_id: str
    activations: dict
    generated: np.ndarray
    positions: np.ndarray = None
    token_ids: np.ndarray = None
    api_request_id: str = ""
    metadata: dict = field(default_factory=dict)
    rules_fired: list = field(default_factory=list)
    fired_positions: list = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.generated)
        self.generated = np.asarray(self.generated, dtype=bool)
        if self.positions is None:
            self.positions = np.arange(n, dtype=np.int64)
        if self.token_ids is None:
            self.token_ids = np.full(n, -1, dtype=np.int64)
        self.api_request_id = self.api_request_id or f"cmpl-{self.request_id}"


def planted_requests(n_pos: int, n_neg: int, d: int, direction: np.ndarray, *, layer: int = 1, n_prompt: int = 4,
                     n_gen: int = 8, strength: float = 10.0, seed: int = 0, noise: float = 0.05) -> list[FakeRequest]:
    """Requests of noise; a positive one carries ``strength × direction`` on two generated tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_pos + n_neg):
        n = n_prompt + n_gen
        x = rng.standard_normal((n, d)).astype(np.float32) * noise
        positive = i < n_pos
        if positive:
            at = n_prompt + rng.choice(n_gen, size=2, replace=False)
            x[at] += strength * direction
        gen = np.r_[np.zeros(n_prompt, bool), np.ones(n_gen, bool)]
        out.append(FakeRequest(f"{'pos' if positive else 'neg'}-{i}", {layer: torch.from_numpy(x)}, gen,
                               metadata={"kind": "pos" if positive else "neg"}))
    rng.shuffle(out)
    return out
