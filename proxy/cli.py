"""Command line: `splitstream serve | check | sim-backend | load | demo | rollout` (also `python -m proxy`).

Parses arguments (`serve`'s also from SPLITSTREAM_* variables; the command line wins) and runs the matching
coroutine on uvloop; the work itself lives in `app.py`, `config/loader.py` and `sim/runtime.py`. Exit codes:
0 ok, 1 invalid rules or a failure at run time, 2 usage. `serve` drains on SIGTERM: it stops accepting, lets
requests and streams in flight finish up to `server.drain_timeout`, then exits 0. SIGHUP reloads the rules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import ssl
import sys
import tempfile
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from proxy import __version__
from proxy.app import build_app
from proxy.config.loader import RULE_SUFFIXES, RulesError, load_rules
from proxy.config.model import RULES
from proxy.config.reloader import RELOADER
from proxy.config.yamlread import redact
from proxy.delivery import client as rollout_client
from proxy.delivery.state import OPERATOR_ACTIONS
from proxy.observe.logs import AccessLog, configure_logging
from proxy.pipeline.connections import HeadDeadlineRunner
from proxy.sim import load
from proxy.sim.runtime import SimConfig
from proxy.sim.runtime import serve as serve_sim
from proxy.store.redis import RedisStore

log = logging.getLogger("splitstream")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2  # 1: invalid rules or a failure at run time; 2: usage

GC_GEN0_THRESHOLD = 10_000

DEMO_PORTS = (9101, 9102)  # the ports rules/demo.yaml names (`demo --backend-ports` moves them)
DEMO_MODELS = (("llama-3.1-8b-instruct", "sim-embed"), ("llama-3.2-3b-instruct", "sim-embed"))

LOG_LEVELS = ("debug", "info", "warning", "error")
# `serve`'s options from the environment (containers, systemd units); a command-line option wins.
RULES_ENV = "SPLITSTREAM_RULES"
HOST_ENV = "SPLITSTREAM_HOST"
PORT_ENV = "SPLITSTREAM_PORT"
REDIS_URL_ENV = "SPLITSTREAM_REDIS_URL"  # the Redis URL without putting its password on the command line
LOG_LEVEL_ENV = "SPLITSTREAM_LOG_LEVEL"
NO_WATCH_ENV = "SPLITSTREAM_NO_WATCH"
LOG_PROBES_ENV = "SPLITSTREAM_LOG_PROBES"
FLAG_VALUES = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}
# `check --skip-env`: what each environment variable holds, named after it: non-empty, one key for a tenant's
# keys_env, and different per variable (two tenants' keys_env must not look like one shared key).
SKIPPED_ENV_VALUE = "splitstream-check-skip-env-{name}"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is nothing to show (None, an unset flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


class _EnvText(str):
    """An option's default as read from the environment: a conversion error names the variable."""

    variable = ""


class _EnvFlag(argparse.Action):
    """A flag whose default may be an environment variable's text (`1`, `true`, `0`, ...): argparse converts
    a text default with `type` only when the flag is absent, so a bad value there is a usage error."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: object = False,
                 help: str | None = None) -> None:  # `help`: the keyword argparse passes
        super().__init__(option_strings, dest, nargs=0, default=default, type=_flag, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)


def _invalid(text: str, problem: str) -> argparse.ArgumentTypeError:
    source = f"${text.variable}=" if isinstance(text, _EnvText) else ""
    return argparse.ArgumentTypeError(f"{source}{str(text)!r} {problem}")


def _flag(text: str) -> bool:
    if text.strip().lower() not in FLAG_VALUES:
        raise _invalid(text, f"is not one of {', '.join(FLAG_VALUES)}")
    return FLAG_VALUES[text.strip().lower()]


def _port(text: str) -> int:
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise _invalid(text, "is not a port number (1-65535)")
    return int(text)


def _ports(text: str) -> tuple[int, int]:
    ports = tuple(_port(part) for part in text.split(","))
    if len(ports) != 2 or ports[0] == ports[1]:
        raise _invalid(text, "is not two different ports, e.g. 9101,9102")
    return ports[0], ports[1]


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise _invalid(text, f"is not one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def _parser(env: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """The command line. Defaults read from `env` are text that argparse converts (and checks) only when the
    option is absent: the command line wins, and a bad variable is a usage error naming the option."""

    def from_env(name: str, default: Any) -> Any:
        if not env.get(name):
            return default
        text = _EnvText(env[name])
        text.variable = name
        return text

    level = argparse.ArgumentParser(add_help=False)  # --log-level after the command too (wins over the one before)
    level.add_argument("--log-level", type=_log_level, choices=LOG_LEVELS, default=argparse.SUPPRESS,
                       help=f"what is logged on stderr [env {LOG_LEVEL_ENV}] (default: info)")
    parser = argparse.ArgumentParser(prog="splitstream", description=__doc__.splitlines()[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", type=_log_level, choices=LOG_LEVELS, default=from_env(LOG_LEVEL_ENV, "info"),
                        help=f"what is logged on stderr [env {LOG_LEVEL_ENV}]")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=description or help_text, parents=[level],
                                   formatter_class=_HelpFormatter)

    serve = command("serve", "run the proxy",
                    "Run the proxy. Every option can also come from the environment variable named in its help; "
                    "an option on the command line wins over the variable.")
    serve.add_argument("--rules", default=from_env(RULES_ENV, "rules"),
                       help=f"directory of *.yaml rule files [env {RULES_ENV}]")
    serve.add_argument("--host", default=from_env(HOST_ENV, "127.0.0.1"),
                       help=f"address to listen on (0.0.0.0: every interface) [env {HOST_ENV}]")
    serve.add_argument("--port", type=_port, default=from_env(PORT_ENV, "8080"),
                       help=f"port to listen on [env {PORT_ENV}]")
    serve.add_argument("--redis", default=None, metavar="URL",
                       help=f"redis://host:port/db shared by replicas (default: ${REDIS_URL_ENV}, else the embedded "
                            f"store); a URL with a password belongs in ${REDIS_URL_ENV}, which `ps` does not show")
    serve.add_argument("--no-watch", action=_EnvFlag, default=from_env(NO_WATCH_ENV, False),
                       help="do not watch the rules directory; reload only on SIGHUP or POST /admin/reload "
                            f"[env {NO_WATCH_ENV}=1]")
    serve.add_argument("--log-probes", action=_EnvFlag, default=from_env(LOG_PROBES_ENV, False),
                       help="also write access-log lines for /healthz, /readyz and /metrics (probes and scrapes) "
                            f"[env {LOG_PROBES_ENV}=1]")

    check = command("check", "validate a rules directory and exit 0 (valid) or 1")
    check.add_argument("rules", nargs="?", default=from_env(RULES_ENV, "rules"),
                       help=f"the rules directory [env {RULES_ENV}]")
    check.add_argument("--skip-env", action="store_true",
                       help="take every environment variable the rules name (api_key_env, keys_env) as set: "
                            "for a CI job without the secrets")

    sim = command("sim-backend", "run a simulated OpenAI-compatible runtime")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=_port, required=True, help="port to listen on")
    sim.add_argument("--model", required=True, help="model name(s), comma-separated")
    sim.add_argument("--tokens-per-second", type=float, default=50.0, help="decode speed of each sequence")
    sim.add_argument("--ttft-ms", type=float, default=20.0, help="time to the first token")
    sim.add_argument("--prefill-tokens-per-second", type=float, default=20000.0,
                     help="the time to the first token grows by the uncached prompt tokens over this (0: it does not)")
    sim.add_argument("--max-batch", type=int, default=16, help="sequences decoded at once; more wait")
    sim.add_argument("--batch-slowdown", type=float, default=0.0,
                     help="each sequence runs 1 + this x (running - 1) times slower: 0 perfect batching (GPU), "
                          "1 one shared throughput (CPU)")
    sim.add_argument("--prefix-cache-tokens", type=int, default=0,
                     help="prefix (KV) cache size in tokens, reported as cached tokens (0: no cache)")
    sim.add_argument("--prefix-block-tokens", type=int, default=16, help="the prefix cache's block size in tokens")
    sim.add_argument("--report-timings", action="store_true",
                     help="chat and completions answers carry llama.cpp's `timings` (prefill apart from queueing)")
    sim.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered 500")
    sim.add_argument("--stream-fail-rate", type=float, default=0.0, help="share of streams cut after a token")
    sim.add_argument("--max-context", type=int, default=0,
                     help="refuse prompt + max_tokens above this many tokens as vLLM does (0: no limit)")
    sim.add_argument("--tls-cert", default=None, metavar="FILE",
                     help="serve https with this PEM certificate (chain); needs --tls-key")
    sim.add_argument("--tls-key", default=None, metavar="FILE", help="the PEM private key of --tls-cert")

    clients = command("load", "send a mixed client load (dashboards demo); prints counts only")
    clients.add_argument("--url", action="append", required=True,
                         help="OpenAI base URL, e.g. http://127.0.0.1:8080/v1 (repeat to take turns)")
    clients.add_argument("--model", required=True, help="the model clients ask for")
    clients.add_argument("--count", type=int, default=0, help="requests to send (0: until stopped)")
    clients.add_argument("--rate", type=float, default=5.0, help="requests per second (0: as fast as possible)")
    clients.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    clients.add_argument("--users", type=int, default=50, help="distinct x-user-id subjects (0: none)")
    clients.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests")
    clients.add_argument("--repeat-share", type=float, default=0.2, help="share of repeated temperature-0 prompts")
    clients.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    clients.add_argument("--seed", type=int, default=None, help="random seed (default: a new one each run)")

    rollout = command("rollout", "show or steer a route's rollout via the admin API")
    rollout.add_argument("action", choices=("status", *OPERATOR_ACTIONS))
    rollout.add_argument("route", nargs="?", help="the route (status without one: every rollout)")
    rollout.add_argument("--url", default=from_env(rollout_client.URL_ENV, rollout_client.DEFAULT_URL),
                         help=f"the proxy [env {rollout_client.URL_ENV}]")
    rollout.add_argument("--token", default=None, help="admin token (default: $SPLITSTREAM_ADMIN_TOKEN)")
    rollout.add_argument("--json", action="store_true", help="print the admin API's JSON")

    demo = command("demo", "two simulated runtimes and the proxy on the demo rules")
    demo.add_argument("--rules", default="rules", help="the rules directory")
    demo.add_argument("--port", type=_port, default=8080, help="the proxy's port")
    demo.add_argument("--backend-ports", type=_ports, default=DEMO_PORTS, metavar="A,B",
                      help="the simulated runtimes' ports; other than the default, the proxy serves a temporary "
                           "copy of the rules whose 127.0.0.1:9101 and :9102 URLs name them")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a reader that stops reading stdout early (`| head`) ends it quietly with 0."""
    try:
        try:
            return _run(_parser().parse_args(argv))
        finally:
            sys.stdout.flush()  # here, not at exit: a closed pipe raises where it can be caught
    except BrokenPipeError:
        # What is still buffered goes nowhere, so the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.command == "check":
        return check(args.rules, skip_env=args.skip_env)
    if args.command == "serve":
        return uvloop.run(serve(args.rules, args.host, args.port, watch=not args.no_watch,
                                redis_url=args.redis or os.environ.get(REDIS_URL_ENV) or None,
                                log_probes=args.log_probes))
    if args.command == "sim-backend":
        config = SimConfig(
            models=tuple(m.strip() for m in args.model.split(",") if m.strip()),
            tokens_per_second=args.tokens_per_second,
            ttft_ms=args.ttft_ms,
            prefill_tokens_per_second=args.prefill_tokens_per_second,
            max_batch=args.max_batch,
            fail_rate=args.fail_rate,
            stream_fail_rate=args.stream_fail_rate,
            max_context=args.max_context,
            prefix_cache_tokens=args.prefix_cache_tokens,
            prefix_block_tokens=args.prefix_block_tokens,
            batch_slowdown=args.batch_slowdown,
            report_timings=args.report_timings,
        )
        try:
            config.validate()
            tls = _sim_tls(args.tls_cert, args.tls_key)
        except ValueError as exc:
            log.error("sim-backend: %s", exc)
            return EXIT_USAGE
        return uvloop.run(_run_until_signal(serve_sim(config, args.host, args.port, ssl_context=tls)))
    if args.command == "load":
        return uvloop.run(_run_until_signal(load.main(load.LoadConfig(
            urls=tuple(args.url), model=args.model, count=args.count, rate=args.rate, concurrency=args.concurrency,
            users=args.users, stream_share=args.stream_share, repeat_share=args.repeat_share,
            max_tokens=args.max_tokens, seed=args.seed,
        ))))
    if args.command == "rollout":
        return rollout_client.run(args.action, args.route, args.url, args.token, args.json)
    if args.command == "demo":
        return uvloop.run(demo(args.rules, args.port, args.backend_ports))
    raise AssertionError(args.command)


def _sim_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server context of `sim-backend --tls-cert/--tls-key` (None: plain http); ValueError says what is
    wrong with them, before anything listens."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError included: not PEM, or a key that is not the certificate's
        raise ValueError(f"cannot load --tls-cert {cert!r} with --tls-key {key!r}: {exc}") from exc
    return context


class _EveryVariable(Mapping[str, str]):
    """An environment in which every variable is set (to SKIPPED_ENV_VALUE): `check --skip-env` validates
    rules that name secrets (`api_key_env`, a tenant's `keys_env`) without having them, and without the
    loader knowing about it."""

    def __getitem__(self, name: str) -> str:
        return SKIPPED_ENV_VALUE.format(name=name)

    def __contains__(self, name: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def check(rules_dir: str, skip_env: bool = False) -> int:
    unchecked = "; environment variables were not checked (--skip-env)" if skip_env else ""
    try:
        snapshot = load_rules(rules_dir, env=_EveryVariable() if skip_env else None)
    except RulesError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        print(f"{rules_dir}: {len(exc.errors)} error(s){unchecked}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{rules_dir}: ok ({len(snapshot.routes)} routes, {len(snapshot.pools)} pools, "
          f"{len(snapshot.backends)} backends){unchecked}")
    return EXIT_OK


async def serve(rules_dir: str, host: str, port: int, ready: asyncio.Event | None = None, watch: bool = True,
                redis_url: str | None = None, log_probes: bool = False) -> int:
    try:
        snapshot = load_rules(rules_dir, generation=1)
    except RulesError as exc:
        for line in exc.errors:
            log.error("invalid rules: %s", line)
        return EXIT_FAILURE
    try:
        store = RedisStore(redis_url) if redis_url else None  # connects lazily; None = embedded store
    except ValueError as exc:
        log.error("invalid --redis URL: %s", redact(str(exc)))
        return EXIT_USAGE
    app = build_app(snapshot, rules_dir=rules_dir, watch_rules=watch, store=store,
                    access_log=AccessLog(log_probes=log_probes))
    rules = app[RULES]
    runner = HeadDeadlineRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=snapshot.server.drain_timeout,
        head_timeout=lambda: rules.current.server.read_timeout,
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    # Before "listening": SIGHUP's default action would end the process. Kept until the end (see below).
    loop.add_signal_handler(signal.SIGHUP, app[RELOADER].request_reload, "signal")
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        await runner.cleanup()
        loop.remove_signal_handler(signal.SIGHUP)
        return EXIT_FAILURE
    # Signals are ours before "listening" is said: whoever stops us on seeing it gets a drain, not a kill.
    with _stop_signals() as stop:
        settle_garbage_collector()
        log.info("splitstream listening on http://%s:%d (rules %s, generation %d)", host, port, rules_dir,
                 snapshot.generation)
        if ready is not None:
            ready.set()
        await stop.wait()
    # The drain timeout is the one the process started with (the runner holds it): reloads do not change it.
    log.info("draining: no new connections; waiting up to %.0fs for requests in flight",
             snapshot.server.drain_timeout)
    await runner.cleanup()
    loop.remove_signal_handler(signal.SIGHUP)  # only now: a SIGHUP while draining must not end the process
    log.info("stopped")
    return EXIT_OK


def settle_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the tail latency of a long-running proxy.

    Measured at c=32 (bench): with CPython's defaults a full collection ran every 1–2 s and scanned every
    object the process ever made (modules, functions, config), 25–45 ms each — which is where p99 went.
    Objects alive once serving starts are frozen out of collection for good, and the youngest generation
    is collected every 10,000 net allocations instead of 700; cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


async def demo(rules_dir: str, port: int, backend_ports: tuple[int, int] = DEMO_PORTS) -> int:
    """Two simulated runtimes and the proxy. Runtimes moved off the ports the demo rules name get a copy of
    the rules that names theirs (in a temporary directory, removed at exit): rules/ itself stays as shipped."""
    if backend_ports == DEMO_PORTS or not os.path.isdir(rules_dir):
        return await _demo(rules_dir, rules_dir, port, backend_ports)
    with tempfile.TemporaryDirectory(prefix="splitstream-demo-rules-") as copy:
        copy_moving_ports(Path(rules_dir), Path(copy), dict(zip(DEMO_PORTS, backend_ports, strict=True)))
        return await _demo(rules_dir, copy, port, backend_ports)


_LOOPBACK_PORT = re.compile(r"(//(?:127\.0\.0\.1|localhost):)(\d+)\b")


def copy_moving_ports(source: Path, target: Path, moved: Mapping[int, int]) -> None:
    """The rule files of `source` into `target`, with loopback URLs on a port in `moved` rewritten to its
    new port. One pass over the text, so swapped ports (9102,9101) stay swapped; nothing else changes."""

    def move(match: re.Match[str]) -> str:
        return match.group(1) + str(moved.get(int(match.group(2)), match.group(2)))

    for path in sorted(source.iterdir()):
        if path.name.endswith(RULE_SUFFIXES) and not path.name.startswith(".") and path.is_file():
            text = path.read_text(encoding="utf-8")
            (target / path.name).write_text(_LOOPBACK_PORT.sub(move, text), encoding="utf-8")


async def _demo(shown_rules: str, rules_dir: str, port: int, backend_ports: tuple[int, int]) -> int:
    readiness = [asyncio.Event() for _ in backend_ports]
    sims = [
        asyncio.create_task(serve_sim(_demo_sim(models), "127.0.0.1", p, up))
        for p, models, up in zip(backend_ports, DEMO_MODELS, readiness, strict=True)
    ]
    # The proxy probes backends at start: let the runtimes listen first, as a deployment's would.
    if not await _all_listening(readiness, sims):
        for task in sims:
            task.cancel()
        results = await asyncio.gather(*sims, return_exceptions=True)
        log.error("simulated runtimes failed to start: %s", [str(r) for r in results if isinstance(r, Exception)])
        return EXIT_FAILURE
    ready = asyncio.Event()
    proxy = asyncio.create_task(serve(rules_dir, "127.0.0.1", port, ready))
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait({proxy, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        where = (f"rules in {shown_rules} (edit them: they reload live)" if shown_rules == rules_dir else
                 f"rules: a copy of {shown_rules} naming these ports in {rules_dir} (edits there reload live; "
                 "removed at exit)")
        _print_demo_help(port, backend_ports, where)
    code = await proxy
    waiting.cancel()
    for task in sims:
        task.cancel()
    await asyncio.gather(*sims, return_exceptions=True)
    return code


def _demo_sim(models: tuple[str, ...]) -> SimConfig:
    """A demo runtime: a prefix cache, so a conversation's next turn reports cached tokens and starts sooner,
    and a mild batch slowdown, so concurrent requests slow each other a little, as on a real GPU."""
    return SimConfig(models=models, tokens_per_second=40.0, ttft_ms=80.0, prefix_cache_tokens=32768,
                     batch_slowdown=0.05)


async def _all_listening(readiness: list[asyncio.Event], sims: list[asyncio.Task[None]]) -> bool:
    """True once every runtime listens; False as soon as one of them fails (e.g. its port is taken)."""
    waiters = [asyncio.ensure_future(up.wait()) for up in readiness]
    pending: set[asyncio.Future[Any]] = {*waiters, *sims}
    while not all(up.is_set() for up in readiness):
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if any(task in done for task in sims):
            for waiter in waiters:
                waiter.cancel()
            return False
    return True


def _print_demo_help(port: int, backend_ports: tuple[int, int], rules: str) -> None:
    base = f"http://127.0.0.1:{port}/v1"
    print(f"""
splitstream demo is running: base_url = {base}
  simulated runtimes on 127.0.0.1:{backend_ports[0]} and :{backend_ports[1]}; {rules}
  status pages: http://127.0.0.1:{port}/ui/   metrics: http://127.0.0.1:{port}/metrics

  curl -sN {base}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "llama-3.1-8b", "stream": true, "messages": [{{"role": "user", "content": "Hello"}}]}}'

  pip install openai; python -c "from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='none'); \\
print(c.chat.completions.create(model='llama-3.1-8b', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"

Ctrl-C (or SIGTERM) stops it.
""", flush=True)


@contextlib.contextmanager
def _stop_signals() -> Iterator[asyncio.Event]:
    """An event SIGTERM and SIGINT set while inside (outside, their default actions end the process)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _wait_for_signal() -> None:
    with _stop_signals() as stop:
        await stop.wait()


async def _run_until_signal(coro: Coroutine[Any, Any, None]) -> int:
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(_wait_for_signal())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopper):
        pending.cancel()
    await asyncio.gather(task, stopper, return_exceptions=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
