"""Synthetic recordings on disk, written with the recording format's own functions."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from monitor.record.format import DIR_MODE, Manifest, write_manifest, write_shard


def write_recording(root: Path, requests: list, *, d_model: int, layers=(1,), model_name: str = "test-model",
                    per_shard: int = 25, dtype: str = "float32") -> Path:
    """``requests``: objects with the RecordedRequest attributes (tests.author.fakes.FakeRequest)."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, DIR_MODE)
    write_manifest(root, Manifest(model_name=model_name, d_model=d_model, layers=list(layers), dtype=dtype,
                                  created_unix_s=time.time()))
    wire = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    for number, start in enumerate(range(0, len(requests), per_shard), 1):
        group = requests[start:start + per_shard]
        rows, offset = [], 0
        for i, r in enumerate(group):
            n = len(r.positions)
            rows.append({"request_id": r.request_id, "api_request_id": r.api_request_id, "metadata": json.dumps(r.metadata),
                         "prompt_tokens": int((~np.asarray(r.generated)).sum()), "generated_tokens": int(np.asarray(r.generated).sum()),
                         "finish_reason": "length", "rules_fired": list(r.rules_fired),
                         "fired_positions": [int(p) for p in r.fired_positions], "reason": "sample",
                         "started_unix_s": 0.0, "finished_unix_s": 0.0, "token_start": offset, "token_count": n})
            offset += n
        write_shard(root, number, {layer: torch.cat([r.activations[layer] for r in group]).to(wire) for layer in layers},
                    np.concatenate([r.token_ids for r in group]), np.concatenate([r.positions for r in group]),
                    np.concatenate([r.generated for r in group]),
                    np.concatenate([np.full(len(r.positions), i, np.int32) for i, r in enumerate(group)]), rows)
    return root
