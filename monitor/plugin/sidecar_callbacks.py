"""The runtime's sidecar callbacks, run on the client's gRPC thread.

They only queue ops for the forward thread (step_hooks.py applies them between steps) and
publish the policy view the engine core decides new requests' policies from, so nothing the
sidecar sends reaches the model mid-step. A mixin of ``Runtime`` (runtime.py), whose
``__init__`` sets the state these methods use.
"""

from __future__ import annotations

import logging
import os
import socket

import torch

from monitor.plugin.steering import PolicyView, view_from_plan
from monitor.protocol import pb

logger = logging.getLogger("vllm.featurewatch")

_MAX_PENDING_OPS = 4096


class SidecarCallbacks:
    def _hello(self) -> pb.Hello:
        dt = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16,
              torch.bfloat16: pb.BFLOAT16}.get(self.tables.dtype, pb.DTYPE_UNSPECIFIED)
        from monitor.plugin import __version__
        return pb.Hello(model_name=self.model_name, d_model=self.d_model,
                        available_layers=self.hooked, dtype=dt, plugin_version=__version__,
                        engine=self.engine, tp_rank=self.tp_rank,
                        instance=f"{socket.gethostname()}:{os.getpid()}",
                        max_tokens_per_step=self.tables.max_tokens)

    def _on_connect(self) -> list[pb.PluginMessage]:
        return [info.start_message() for info in list(self.requests.values())]

    def _on_message(self, msg: pb.SidecarMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "plan":
            self.ops.append(("plan", msg.plan.SerializeToString()))
            # The engine core decides policies from this view; the op above is queued first, so
            # any request decided with it is scheduled after the plan is applied. Policies the
            # worker will refuse are left out (no salt, no decision for them).
            self._publish_view(view_from_plan(msg.plan, self.steering.valid_policy))
            self.counters.plans_received += 1  # after the view: a reader of it sees the view
        elif kind == "directive":
            self.counters.directives_received += 1
            if len(self.ops) >= _MAX_PENDING_OPS:  # an idle engine applies nothing: bound it
                self.counters.directives_rejected += 1
                return
            self.ops.append(("directive", msg.directive.SerializeToString()))

    def _on_disconnect(self) -> None:
        self.ops.append(("disconnect", b""))
        if self.steering.failure_mode != "closed":
            self._publish_view(PolicyView(False, ()))

    def _publish_view(self, view: PolicyView | None = None,
                      without: set[str] = frozenset()) -> None:
        """Publish ``view``, or the current one less the policies ``without`` (both threads)."""
        with self._lock:
            if view is None:
                view = self.view.without(set(without))
            self.view = view
            self._write_view(view)

    def _write_view(self, view: PolicyView) -> None:
        if self._view_file:
            tmp = self._view_file + ".tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(view.to_json())
                os.replace(tmp, self._view_file)
            except OSError:
                logger.exception("featurewatch: cannot write %s", self._view_file)

    def _stats(self) -> pb.PluginStats:
        c = self.counters
        return pb.PluginStats(
            batches_enqueued=c.batches_enqueued,
            batches_dropped_queue_full=c.batches_dropped_queue_full,
            batches_sent=c.batches_sent, tokens_tapped=c.tokens_tapped,
            enqueue_seconds_sum=c.enqueue_seconds_sum, enqueue_count=c.enqueue_count,
            reconnects=c.reconnects, cached_prompt_tokens_untapped=c.cached_prompt_tokens_untapped,
            steering_rows_applied=c.steering_rows_applied,
            directives_rejected=c.directives_rejected,
            queue_depth=self.client.queue_depth if self.client else 0,
            queue_capacity=self.cfg.queue_batches,
            policy_tokens_steered=self.steering.steered.policies.copy(),
            rule_tokens_steered=self.steering.steered.rules.copy())
