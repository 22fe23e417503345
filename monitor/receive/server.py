"""gRPC services: the operators' admin API (bearer token). The plugin's ingest stream lives in
:mod:`monitor.receive.ingest` (imported here too, where the sidecar finds both)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

import grpc

from monitor.evaluate.rules import RulesInvalid
from monitor.protocol import pb, pb_grpc
from monitor.receive.ingest import CREDIT_EVERY, IngestService, PluginStream  # noqa: F401 - re-exported
from monitor.rules_file import RulesFileReadOnly
from monitor.stores.base import StoreUnavailable

log = logging.getLogger(__name__)


class AdminService(pb_grpc.AdminServicer):
    """Rules get/put/validate, the steering kill switch, and the event tail. Token required."""

    def __init__(self, sidecar) -> None:
        self.sidecar = sidecar

    async def _authorize(self, context) -> None:
        token = self.sidecar.config.admin_token
        if not token:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"admin API disabled: set ${self.sidecar.config.admin_token_env} on the sidecar")
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")

    async def GetRules(self, request, context):
        """The rules in force on this sidecar, and where they came from."""
        await self._authorize(context)
        rules, origin = self.sidecar.rules, self.sidecar.rules_origin
        return pb.RuleSet(yaml=rules.yaml, version=rules.version, author=origin.author,
                          updated_unix_s=origin.updated_unix_s, source=origin.describe(), store=origin.store)

    async def PutRules(self, request, context):
        await self._authorize(context)
        try:
            compiled = await asyncio.to_thread(self.sidecar.compile, request.yaml, "<admin>")
        except RulesInvalid as exc:  # refused, naming file, rule ("policy:<name>" for a policy) and field
            return pb.PutRulesResponse(ok=False, errors=[
                pb.RuleError(file=e.file, rule=e.wire_rule, field=e.field, message=e.message) for e in exc.errors])
        except Exception as exc:  # a compile failure nothing anticipated: still the input's fault, never UNKNOWN
            log.exception("PutRules: rules could not be compiled")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"rules could not be compiled, rules in force unchanged: {type(exc).__name__}: {str(exc)[:200]}")
        version = self.sidecar.rules.version
        watcher = self.sidecar.rules_file
        if watcher is not None and not request.dry_run:  # the rules file is authoritative: write it
            try:
                version = await asyncio.to_thread(watcher.write, request.yaml, request.author or "admin")
            except RulesFileReadOnly as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            except Exception as exc:  # noqa: BLE001 - the file could not be written or applied
                log.error("PutRules: rules file %s: %s", watcher.path, exc)
                await context.abort(grpc.StatusCode.ABORTED, f"rules file {watcher.path}: {type(exc).__name__}: "
                                    f"{str(exc)[:300]}")
            return pb.PutRulesResponse(ok=True, version=version, rules=len(compiled.rules),
                                       policies=len(compiled.policies), written_to=str(watcher.path))
        if not request.dry_run:
            try:
                version = await asyncio.to_thread(self.sidecar.publish_rules, request.yaml, request.author or "admin")
            except Exception as exc:  # the store is away (e.g. Redis down): nothing changed anywhere
                self.sidecar.metrics.store_errors.labels(type(self.sidecar.rule_store).__name__, "put").inc()
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"rule store unavailable, rules in force unchanged (v{version}): {exc}")
        return pb.PutRulesResponse(ok=True, version=version, rules=len(compiled.rules), policies=len(compiled.policies))

    async def SetSteering(self, request, context):
        await self._authorize(context)
        self.sidecar.set_steering(request.steering_enabled, request.author or "admin")
        return pb.KillSwitchState(steering_enabled=self.sidecar.steering.enabled)

    async def TailAlerts(self, request, context):
        await self._authorize(context)
        store = self.sidecar.event_store

        async def tail(last: int) -> list[dict]:
            try:
                return await asyncio.to_thread(store.tail, last)
            except StoreUnavailable as exc:  # Redis away: nothing to read now; new events wait in a buffer
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"event store unavailable, try again later (new events are buffered): {exc}")

        events = await tail(request.last)
        last_id = None
        for event in events:
            last_id = event.get("id", last_id)
            yield event_message(event)
        if not request.follow:
            return
        if last_id is None:
            recent = await tail(1)
            last_id = recent[-1]["id"] if recent else "0-0"
        while not context.cancelled():  # follow() itself waits out a Redis outage
            for event in await asyncio.to_thread(store.follow, last_id, 500):
                last_id = event.get("id", last_id)
                yield event_message(event)


def event_message(event: dict) -> pb.AlertEvent:
    return pb.AlertEvent(
        event_id=str(event.get("id", "")), kind=str(event.get("kind", "")), rule=str(event.get("rule", "") or event.get("policy", "")),
        severity=str(event.get("severity", "")), request_id=str(event.get("request_id", "")),
        api_request_id=str(event.get("api_request_id", "")), unix_s=float(event.get("unix_s", 0.0)),
        json=json.dumps(event, default=str, sort_keys=True),
    )
