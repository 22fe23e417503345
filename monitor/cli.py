"""`featurewatch`: run the sidecar, manage rules, watch alerts, run the demo."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from monitor.author.cli import register as register_authoring
from monitor.models.cli import model_app

app = typer.Typer(help="featurewatch: watch SAE features and probes inside served LLMs.", no_args_is_help=True)
rules_app = typer.Typer(help="Validate, apply and read alert rules.", no_args_is_help=True)
alerts_app = typer.Typer(help="Read the alert and audit event stream.", no_args_is_help=True)
steering_app = typer.Typer(help="The steering kill switch.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(alerts_app, name="alerts")
app.add_typer(steering_app, name="steering")
from monitor.record.cli import record_app  # noqa: E402  (the flight recorder's reader)

app.add_typer(record_app, name="record")
app.add_typer(model_app, name="model")
register_authoring(app, rules_app)  # features compare, probes train, rules calibrate/backtest
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DEFAULT_ADDRESS = "unix:///tmp/featurewatch.sock"
AddressOpt = typer.Option(DEFAULT_ADDRESS, "--address", "-a", envvar="FEATUREWATCH_ADDRESS",
                          help="Sidecar gRPC address: unix:///path or host:port.")
TokenOpt = typer.Option(None, "--token", envvar="FEATUREWATCH_ADMIN_TOKEN", help="Admin bearer token.")


def _fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)  # a message may hold user text with [brackets]
    raise typer.Exit(code)


@app.command()
def serve(config: Path = typer.Option(..., "--config", "-c", exists=True, dir_okay=False, help="Sidecar YAML config."),
          log_level: str = typer.Option("INFO", help="Python log level.")) -> None:
    """Run the sidecar: gRPC ingest + admin (Unix socket and TCP), health, /metrics.

    Neither the rules nor Redis can stop it from starting: a bad rules file is reported (logged,
    featurewatch_rule_reloads_total{result="error"}) and the sidecar serves the store's rules or none
    until the file is fixed; with Redis away it serves the file's rules and stores them when Redis is
    back. Exit 2: the config (or a dictionary it names) cannot be used; 1: any other start failure;
    both with one line on stderr (--log-level DEBUG adds the traceback)."""
    from monitor.config import ConfigError, load_config
    from monitor.encode.errors import SAEFormatError
    from monitor.sidecar import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config)
        asyncio.run(run(cfg))
    except (ConfigError, SAEFormatError) as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except Exception as exc:  # noqa: BLE001 - one line for the operator; the traceback at DEBUG
        logging.getLogger("featurewatch").debug("serve failed", exc_info=True)
        _fail(f"featurewatch serve stopped: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", 1)


@rules_app.command("validate")
def rules_validate(file: Path = typer.Argument(..., exists=True, dir_okay=False),
                   config: Optional[Path] = typer.Option(None, "--config", "-c", help="Also check sources, features and probes against this sidecar config.")) -> None:
    """Check a rules file; with --config, compile it against the configured SAEs and probes.

    Exit 0: valid; 2: refused (every problem printed with file, rule/policy and field)."""
    from rich.markup import escape

    from monitor.evaluate.rules import RulesInvalid, load_rules_file

    try:
        if config is None:
            spec = load_rules_file(file)
            n_rules, n_policies = len(spec.rules), len(spec.policies)
        else:
            from monitor.config import ConfigError, load_config
            from monitor.encode.stage import Dictionaries
            from monitor.evaluate.compiler import load_and_compile

            try:
                cfg = load_config(config)
            except ConfigError as exc:
                _fail(str(exc), 2)
            compiled = load_and_compile(file, Dictionaries(cfg.sources), layers=cfg.layers(),
                                        direction_dirs=cfg.direction_roots(rules_file=file))
            n_rules, n_policies = len(compiled.rules), len(compiled.policies)
    except RulesInvalid as exc:
        for e in exc.errors:
            err.print(f"[red]✗[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2)
    checked = "schema and references" if config else "schema only (pass --config to check references)"
    console.print(f"[green]✓[/green] {file}: {n_rules} rules, {n_policies} policies valid ({checked})")


def _admin(address: str, token: Optional[str]):
    import grpc

    from monitor.protocol import pb_grpc

    if not token:
        _fail("an admin token is required: --token or $FEATUREWATCH_ADMIN_TOKEN", 2)
    channel = grpc.insecure_channel(address)
    return pb_grpc.AdminStub(channel), [("authorization", f"Bearer {token}")]


def _rpc(call):
    import grpc

    try:
        return call()
    except grpc.RpcError as exc:
        _fail(f"{exc.code().name}: {exc.details()}")


@rules_app.command("apply")
def rules_apply(file: Path = typer.Argument(..., exists=True, dir_okay=False), address: str = AddressOpt,
                token: Optional[str] = TokenOpt, author: str = typer.Option(os.environ.get("USER", "cli"), help="Recorded in the audit stream."),
                dry_run: bool = typer.Option(False, "--dry-run", help="Validate and compile on the sidecar only.")) -> None:
    """Send a rules file to a running sidecar (validated and compiled there before it is stored)."""
    from rich.markup import escape

    from monitor.evaluate.rules import RulesInvalid, format_error, read_rules_text
    from monitor.protocol import pb

    try:
        text = read_rules_text(file)  # not UTF-8, over 1 MiB, not a regular file: refused here
    except RulesInvalid as exc:
        _fail(str(exc), 2)
    stub, md = _admin(address, token)
    reply = _rpc(lambda: stub.PutRules(pb.PutRulesRequest(yaml=text, author=author, dry_run=dry_run), metadata=md, timeout=30))
    if not reply.ok:
        for e in reply.errors:
            err.print(f"[red]✗[/red] {escape(format_error(str(file), e.rule, e.field, e.message))}", highlight=False)
        _fail("rules rejected; the sidecar keeps its current rules")
    if dry_run:
        verb = "valid (dry run)"
    elif reply.version:
        verb = f"applied as version {reply.version}"
    else:
        verb = "applied on this sidecar (not in the store yet: it is stored when the store answers)"
    console.print(f"[green]✓[/green] {reply.rules} rules, {reply.policies} policies {verb}", highlight=False)
    if reply.written_to:
        console.print(f"  written to {reply.written_to}: the sidecar's rules file, authoritative on it", highlight=False)


@rules_app.command("get")
def rules_get(address: str = AddressOpt, token: Optional[str] = TokenOpt) -> None:
    """Print the rules in force on a running sidecar, after a comment line saying where they came from."""
    from monitor.protocol import pb

    stub, md = _admin(address, token)
    reply = _rpc(lambda: stub.GetRules(pb.GetRulesRequest(), metadata=md, timeout=10))
    when = f" at {time.ctime(reply.updated_unix_s)}" if reply.updated_unix_s else ""
    err.print(f"# version {reply.version} from {reply.source or '?'}{when}", highlight=False)
    sys.stdout.write(reply.yaml)


@steering_app.command("off")
def steering_off(address: str = AddressOpt, token: Optional[str] = TokenOpt) -> None:
    """Kill switch: stop all steering on every connected plugin."""
    _set_steering(address, token, False)


@steering_app.command("on")
def steering_on(address: str = AddressOpt, token: Optional[str] = TokenOpt) -> None:
    """Re-enable steering."""
    _set_steering(address, token, True)


def _set_steering(address: str, token: Optional[str], enabled: bool) -> None:
    from monitor.protocol import pb

    stub, md = _admin(address, token)
    reply = _rpc(lambda: stub.SetSteering(pb.KillSwitchRequest(steering_enabled=enabled, author=os.environ.get("USER", "cli")), metadata=md, timeout=10))
    console.print(f"steering {'enabled' if reply.steering_enabled else 'disabled'}")


@alerts_app.command("tail")
def alerts_tail(address: str = AddressOpt, token: Optional[str] = TokenOpt,
                redis_url: Optional[str] = typer.Option(None, "--redis", help="Read the Redis event stream directly instead of a sidecar."),
                prefix: str = typer.Option("featurewatch", help="Redis key prefix."),
                last: int = typer.Option(20, "--last", "-n", help="Show this many recent events first."),
                follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
                as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Show recent alert/audit events, from a sidecar's admin API or straight from Redis."""
    printer = _EventPrinter(as_json)
    if redis_url:
        from monitor.stores.redis import RedisEventStore
        from monitor.stores.redis.connection import safe_url

        try:
            store = RedisEventStore(redis_url, prefix=prefix)
            events = store.tail(last)
            for e in events:
                printer(e)
            after = events[-1]["id"] if events else None
            while follow:
                for e in store.follow(after, 1000):
                    after = e["id"]
                    printer(e)
        except KeyboardInterrupt:
            pass
        except Exception as exc:  # Redis away or refusing: one line, no traceback
            _fail(f"cannot read the event stream at {safe_url(redis_url)}: {type(exc).__name__}: {exc}", 1)
        return
    from monitor.protocol import pb

    stub, md = _admin(address, token)

    def stream():
        for msg in stub.TailAlerts(pb.TailAlertsRequest(last=last, follow=follow), metadata=md):
            printer(json.loads(msg.json))

    try:
        _rpc(stream)
    except KeyboardInterrupt:
        pass


class _EventPrinter:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def __call__(self, e: dict) -> None:
        if self.as_json:
            print(json.dumps(e, default=str), flush=True)
            return
        when = time.strftime("%H:%M:%S", time.localtime(float(e.get("unix_s", 0))))
        kind = e.get("kind", "?")
        colour = {"alert": "red", "steering": "magenta", "rules": "cyan"}.get(kind, "white")
        what = e.get("rule") or e.get("policy") or e.get("action") or ""
        if e.get("trigger") == "kill_switch":  # the kill switch: say which way it was thrown
            what = f"kill switch: steering {'on' if e.get('steering_enabled') else 'off'}"
        detail = " ".join(f"{k}={e[k]}" for k in ("mode", "severity", "api_request_id", "position", "value", "version", "author", "error")
                          if e.get(k) not in (None, ""))
        console.print(f"{when} [{colour}]{kind:8}[/{colour}] {what} {detail}", highlight=False)
        context = _context_line(e) if kind == "alert" else ""
        if context:  # model text: never rich markup, never a control character
            console.print(f"         context: {context}", markup=False, highlight=False)


def _context_line(e: dict) -> str:
    """An alert's context: the text (sidecar with a tokenizer), else the token ids, firing one marked."""
    if isinstance(e.get("context"), str):
        return "".join(c if c >= " " and not "\x7f" <= c <= "\x9f" else "\ufffd" for c in e["context"])
    ids, start, position = e.get("context_token_ids"), e.get("context_start"), e.get("position")
    if not isinstance(ids, list) or not isinstance(start, int) or not isinstance(position, int):
        return ""
    return " ".join(f"⟦{t}⟧" if start + k == position else str(t) for k, t in enumerate(ids)) + \
        f" (token ids from position {start})"


@app.command()
def demo(model: str = typer.Option("planted", help="planted: the embedded planted-concept model; smollm2: "
                                                   "SmolLM2-135M-Instruct (fetched once into the cache) with the shipped SAE and probes."),
         requests: Optional[int] = typer.Option(None, help="Eliciting prompts per concept (and neutral) per phase (default 24; smollm2: 18, every held-out prompt of a concept)."),
         max_tokens: Optional[int] = typer.Option(None, help="Tokens generated per request (default 24; smollm2: 48)."),
         linger: Optional[float] = typer.Option(None, help="Seconds to keep /metrics up afterwards (default: until Ctrl-C on a terminal, 0 otherwise)."),
         metrics_port: int = typer.Option(9400, help="Sidecar /metrics port (a free one if taken)."),
         workdir: Optional[Path] = typer.Option(None, help="Keep configs, logs and results here."),
         assets: Optional[Path] = typer.Option(None, help="A demo assets dir (default: the shipped one; rebuild with python -m monitor.demo.build)."),
         record: bool = typer.Option(False, "--record", help="Record every request (<workdir>/recording) and write the ground truth (<workdir>/labels.jsonl) for the authoring commands.")) -> None:
    """Serve a model with vLLM + plugin + sidecar; show alerts against ground truth and steering."""
    from monitor.demo.run import Options, run_demo

    logging.basicConfig(level="WARNING")
    if model not in ("planted", "smollm2"):
        typer.echo(f"error: --model {model!r}: known models are planted, smollm2", err=True)
        raise typer.Exit(2)
    if model == "smollm2" and (assets is not None or record):
        typer.echo("error: --assets and --record are for the planted model", err=True)
        raise typer.Exit(2)
    real = model == "smollm2"  # a real 135M chat model: its held-out prompts, longer answers
    n = requests if requests is not None else (18 if real else 24)
    options = Options(requests_per_concept=n, neutral_requests=n, max_tokens=max_tokens or (48 if real else 24),
                      linger_s=linger, metrics_port=metrics_port, workdir=workdir, record=record)
    if assets is not None:
        options.assets = assets
    if real:
        from monitor.models.smollm2.demo import SmolLM2Demo

        run_demo(options, demo_class=SmolLM2Demo)
    else:
        run_demo(options)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
