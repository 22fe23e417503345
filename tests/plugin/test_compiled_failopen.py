"""The compiled path fails open too (issue 11): inside a torch.compile'd forward (vLLM compiles
with fullgraph=True) no Python try/except can surround the hook, so the op falls back on its own
(the residual unchanged, counted) and the hook traces vLLM's output untouched when it is not the
family's convention (the self-test then fails, and the plugin goes idle)."""

from __future__ import annotations

import pytest
import torch

from monitor.plugin import failopen, ops
from monitor.plugin.families import Convention
from monitor.plugin.hooks import LayerHook, attach_buffers

D = 4


@pytest.fixture(autouse=True)
def _clean():
    failopen.reset()
    torch._dynamo.reset()
    yield
    failopen.reset()
    ops.set_step_live(False)
    torch._dynamo.reset()


class Layer(torch.nn.Module):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, D)
        self.out = out

    def forward(self, x):
        y = self.lin(x)
        return y if self.out == "tensor" else (y, x)


def _hooked(conv: Convention, out: str):
    t = ops.SteerTables(num_layers=1, d_model=D, rows=4, clamps=1, max_tokens=8,
                        device=torch.device("cpu"), dtype=torch.float32, do_tap=True)
    layer = Layer(out)
    attach_buffers(layer, t, 0)
    layer.register_forward_hook(LayerHook(0, 0, t, conv))
    return t, layer


def test_a_failing_op_returns_the_residual_and_is_counted_in_a_compiled_graph():
    t, layer = _hooked(Convention.HIDDEN_RESIDUAL, "pair")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, D)
    with torch.no_grad():
        want = layer.lin(x)
        t.steer_idx[:3] = 99  # no such steering row: the op's index_select fails at run time
        ops.set_step_live(True)
        h, r = compiled(x)
    assert torch.equal(h, want) and torch.equal(r, x)  # vLLM's own (hidden, residual)
    assert failopen.errors() == {"tap_steer": 1}


def test_an_output_not_of_the_convention_is_traced_untouched():
    t, layer = _hooked(Convention.HIDDEN_RESIDUAL, "tensor")  # a bare tensor, not a pair
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    t.tap.fill_(float("nan"))
    x = torch.randn(3, D)
    with torch.no_grad():
        out = compiled(x)
        assert torch.equal(out, layer.lin(x))
    assert bool(torch.isnan(t.tap).all())  # nothing tapped: the self-test's tap_written fails


def test_the_compiled_hook_taps_and_steers_when_the_convention_holds():
    t, layer = _hooked(Convention.STREAM, "tensor")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    t.add[0, 1] = torch.tensor([0.0, 0.0, 5.0, 0.0])
    t.row_on[0, 1] = True
    t.steer_idx[:2] = torch.tensor([1, 0])
    ops.set_step_live(True)
    x = torch.randn(2, D)
    with torch.no_grad():
        out = compiled(x)
        want = layer.lin(x)
    want[0, 2] += 5.0
    assert torch.allclose(out, want) and torch.allclose(t.tap[0, :2], want)
    assert failopen.errors() == {}
