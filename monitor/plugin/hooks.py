"""Find a model's decoder layers and install the tap/steer forward hooks (at load, before compile)."""

from __future__ import annotations

import logging

import torch
from torch import nn

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


class LayerHook:
    """Forward hook of one decoder layer. Python here runs when the layer is called eagerly or
    traced (Dynamo inlines it); only tensor ops on the fixed buffers reach compiled code/graphs."""

    def __init__(self, layer_index: int, slot: int, tables: SteerTables) -> None:
        self.layer_index = layer_index
        self.slot = slot
        self.args = tables.layer_args(slot)
        self.do_tap = tables.do_tap

    def __call__(self, module: nn.Module, args, output):
        op = torch.ops.featurewatch.tap_steer
        if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
            hidden, residual = output  # deferred add: the stream is hidden + residual
            return hidden, op(hidden, residual, *self.args, self.do_tap)
        if isinstance(output, torch.Tensor):  # the layer returns the residual stream itself
            return op(None, output, *self.args, self.do_tap)
        if isinstance(output, tuple) and len(output) >= 1 and isinstance(output[0], torch.Tensor):
            if len(output) == 2 and output[1] is None:
                return op(None, output[0], *self.args, self.do_tap), None
        return output


def install_hooks(
    model: nn.Module, num_layers: int, layers: list[int], tables: SteerTables
) -> tuple[str, list[int], list]:
    """Register hooks on ``layers`` (those this pipeline rank owns). Returns the ModuleList's
    name, the hooked layers (slot order) and the hook handles."""
    name, modules = find_decoder_layers(model, num_layers)
    hooked: list[int] = []
    handles = []
    for layer in layers:
        if is_missing_layer(modules[layer]):
            continue
        slot = len(hooked)
        handles.append(modules[layer].register_forward_hook(LayerHook(layer, slot, tables)))
        hooked.append(layer)
    logger.info("featurewatch: hooked %s[%s]", name, ",".join(map(str, hooked)))
    return name, hooked, handles
