"""Find a model's decoder layers; the tap/steer forward hook and its per-layer buffers."""

from __future__ import annotations

import logging

import torch
from torch import nn

from monitor.plugin import ops
from monitor.plugin.families import Convention, join, split
from monitor.plugin.ops import SteerTables

logger = logging.getLogger("vllm.featurewatch")


def find_decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` holding the decoder layers (``model.layers`` for most vLLM models,
    ``language_model.model.layers`` for multimodal wrappers): the shortest-named list ending in
    ``layers`` whose length is the config's layer count."""
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
        and len(mod) == num_layers
    ]
    if not candidates:
        raise RuntimeError(
            f"featurewatch: no ModuleList of {num_layers} decoder layers found in "
            f"{type(model).__name__}"
        )
    candidates.sort(key=lambda c: (c[0].count("."), len(c[0])))
    return candidates[0]


def is_missing_layer(module: nn.Module) -> bool:
    """Pipeline parallelism replaces layers another rank owns with ``PPMissingLayer``."""
    return type(module).__name__ == "PPMissingLayer"


BUFFER_PREFIX = "_featurewatch_"


def attach_buffers(module: nn.Module, tables: SteerTables, slot: int) -> None:
    """Register one layer's views of the tables as non-persistent buffers of the layer, so that
    compiled graphs (and vLLM's AOT compile cache) reach them by a stable module path."""
    for name, t in zip(SteerTables.ARG_NAMES, tables.layer_args(slot), strict=True):
        module.register_buffer(BUFFER_PREFIX + name, t, persistent=False)


class LayerHook:
    """Forward hook of one decoder layer. Python here runs when the layer is called eagerly or
    traced (Dynamo inlines it); only tensor ops on the fixed buffers reach compiled code/graphs.

    Eager calls with no steered token this step (and no CUDA graph being captured) skip the op:
    they only copy the residual stream into the tap buffer and leave the output untouched.
    """

    def __init__(self, layer_index: int, slot: int, tables: SteerTables,
                 conv: Convention = Convention.HIDDEN_RESIDUAL) -> None:
        self.layer_index = layer_index
        self.conv = conv  # the model family's output convention (families.py), never inferred
        self.enabled = True  # False once the self-test failed: vLLM's output, untouched
        self.slot = slot
        self.max_tokens = tables.max_tokens
        self.do_tap = tables.do_tap
        self.max_norm = tables.max_norm
        self.tap = tables.tap[slot]  # eager path only; traced code reads the module's buffers

    def __call__(self, module: nn.Module, args, output):
        if not self.enabled:
            return output
        if torch.compiler.is_compiling():
            # Traced (fullgraph): no try/except here. What could fail is decided at trace time
            # — the output's structure — and a mismatch traces vLLM's output untouched (no tap:
            # the self-test fails and the plugin goes idle). Failures at run time happen inside
            # the opaque op, which falls back on its own (ops._tap_steer).
            if split(output, self.conv, strict=False) is None:
                return output
            return self._apply(module, output)
        try:
            return self._apply(module, output)
        except Exception:  # noqa: BLE001 - the layer's own output: vLLM's forward unchanged
            from monitor.plugin import failopen

            failopen.failed("layer_hook")
            return output

    def _apply(self, module: nn.Module, output):
        hidden, residual = split(output, self.conv)
        if not (torch.compiler.is_compiling() or ops._STEP["live"] or ops.capturing()):
            if self.do_tap:
                n = residual.shape[0]
                if n > self.max_tokens:
                    n = self.max_tokens
                    residual = residual[:n]
                    hidden = None if hidden is None else hidden[:n]
                if hidden is None:
                    self.tap[:n].copy_(residual)
                else:
                    torch.add(hidden, residual, out=self.tap[:n])
            return output
        bufs = [getattr(module, BUFFER_PREFIX + name) for name in SteerTables.ARG_NAMES]
        new_res = torch.ops.featurewatch.tap_steer(hidden, residual, *bufs, self.do_tap,
                                                   self.max_norm)
        return join(output, self.conv, new_res)
