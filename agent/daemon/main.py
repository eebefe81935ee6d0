"""driftwatch-agent: config, logging, signals, sd_notify, and wiring cache, server and watcher."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from prometheus_client.registry import CollectorRegistry

from agent import __version__
from agent.daemon.collector_cache import Inspect, SnapshotCache
from agent.config import LOG_LEVELS, Config, load_config
from agent.daemon.worker import WorkerInspect
from agent.errors import ConfigError, DriftwatchError
from agent.daemon.metrics import DriftwatchCollector
from agent.daemon.process import FactoryRef, _Formatter, candidate_predicate, setup_logging, stop_children  # noqa: F401
from agent.daemon.server import AgentHTTPServer, AgentUnixServer
from agent.snapshot import Snapshot
from agent.daemon.watch import UnitWatcher
from agent.daemon.webconfig import WebConfig, load_web_config

log = logging.getLogger("driftwatch")

PROG = "driftwatch-agent"
DEFAULT_INSPECTOR = "agent.privileged.inspector:make_inspector"
# Root-only: `agentctl status` prefers it (full detail, and no other user can answer on it).
DEFAULT_UNIX_SOCKET = "/run/driftwatch/agent.sock"
TICK_SECONDS = 1.0
InspectorFactory = Callable[[Config], Inspect]
WatcherFactory = Callable[..., Any]


# -- sd_notify ----------------------------------------------------------------------------
def sd_notify(*states: str) -> bool:
    """Send KEY=VALUE states to $NOTIFY_SOCKET (a no-op returning False outside systemd)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    # By hand, not pystemd.daemon: importing pystemd loads its lxml-based introspection
    # (~9 MiB) into the daemon serving HTTP.
    return _socket_notify("\n".join(states))


def _socket_notify(message: str) -> bool:
    """The sd_notify protocol by hand: one datagram; '@' names an abstract socket."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2


def status_line(snapshot: Snapshot | None, listen_address: str, last_error: str = "") -> str:
    """Pure: the one-line STATUS= systemctl status shows."""
    if snapshot is None:
        text = f"serving on {listen_address}; no inspection yet"
        return text + ("; last inspection failed" if last_error else " (runs on first scrape)")
    units = len(snapshot.units)
    parts = [f"watching {units} unit{'s' if units != 1 else ''}"]
    pending = sum(1 for u in snapshot.units if u.migrations and u.migrations.pending)
    problems = sum(1 for u in snapshot.units if u.has_problems)
    if pending:
        parts.append(f"{pending} with pending migrations")
    if problems:
        parts.append(f"{problems} with problems")
    if not pending and not problems:
        parts.append("no problems")
    if last_error:
        parts.append("last inspection failed")
    return "; ".join(parts)


def check_web_limits(config: Config) -> None:
    """A request must be allowed to outlast the longest a scrape waits for an inspection."""
    if config.request_timeout_seconds <= config.scrape_wait_seconds:
        raise ConfigError(f"{config.source or 'configuration'}: 'request_timeout_seconds' "
                          f"({config.request_timeout_seconds:g}) must be larger than "
                          f"'scrape_wait_seconds' ({config.scrape_wait_seconds:g})")


def configured_units(config: Config) -> list[str]:
    """The configured unit names as systemd spells them (gunicorn -> gunicorn.service)."""
    from agent.privileged.sources.systemd import DEFAULT_UNIT, normalize_unit_name
    return [normalize_unit_name(n) for n in config.units] or [DEFAULT_UNIT]


# -- the daemon ---------------------------------------------------------------------------
class Daemon:
    """Owns the cache, the HTTP server and the watcher; run() is the main loop."""

    def __init__(self, config: Config, inspector_factory: InspectorFactory,
                 config_path: str | None = None, overrides: dict[str, Any] | None = None,
                 watcher_factory: WatcherFactory | None = UnitWatcher,
                 web_config_path: str | None = None, unix_socket: str = "",
                 worker: bool = False) -> None:
        """WORKER: inspect and watch in a worker process (the real daemon: pystemd holds the
        GIL in D-Bus calls); else in this process (tests embedding a Daemon)."""
        check_web_limits(config)
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.web_config_path = web_config_path
        self.web = load_web_config(web_config_path)
        self.unix_socket = unix_socket
        self._inspector_factory = inspector_factory
        self._watcher_factory = watcher_factory
        self.worker = self._make_worker(config) if worker else None
        self.cache = SnapshotCache(self.worker or inspector_factory(config),
                                   config.min_interval_seconds,
                                   max_wait_seconds=config.scrape_wait_seconds)
        self.registry = CollectorRegistry()
        self.registry.register(DriftwatchCollector(self.cache.get, self.cache.stats))
        self.server: AgentHTTPServer | None = None
        self.unix_server: AgentUnixServer | None = None
        self.watcher: Any = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = False
        self._reload = False
        self._last_tick = time.monotonic()
        self._last_status = ""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve, start the watcher, then tell systemd we are ready."""
        self.server = self._make_server(self.config, self.web)   # bind first: may fail
        if self.worker is not None:
            try:
                self.worker.start()
            except DriftwatchError:
                self.server.server_close()
                raise
        if self.unix_socket:
            try:
                self.unix_server = AgentUnixServer(
                    self.unix_socket, self.registry, self.status, self.health,
                    request_timeout_seconds=self.config.request_timeout_seconds)
                self.unix_server.start()
            except DriftwatchError as exc:
                # An extra, not a reason to stop watching: agentctl falls back to TCP.
                log.error("%s; agentctl status will use TCP", exc)
        self.server.start()
        if self._watcher_factory is not None and self.worker is None:
            self.watcher = self._watcher_factory(
                self.cache.invalidate, units=configured_units(self.config),
                is_candidate=candidate_predicate(self.config))
            self.watcher.start()
        log.info("driftwatch-agent %s serving on %s%s%s%s (config: %s)", __version__,
                 self.config.listen_address, " with TLS" if self.server.web.tls else "",
                 " and basic auth" if self.server.web.users else "",
                 f" and {self.unix_socket}" if self.unix_server else "",
                 self.config.source or "built-in defaults")
        self._notify_status(force=True, ready=True)

    def _make_worker(self, config: Config) -> WorkerInspect:
        return WorkerInspect(self._inspector_factory, config,
                             on_change=lambda unit: self.cache.invalidate(unit),
                             units=configured_units(config),
                             watch=self._watcher_factory is not None)

    def _make_server(self, config: Config, web: WebConfig) -> AgentHTTPServer:
        return AgentHTTPServer(config.listen_address, self.registry, self.status, self.health,
                               self._make_server_web(config, web),
                               max_connections=config.max_connections,
                               request_timeout_seconds=config.request_timeout_seconds)

    def run(self) -> int:
        """Main loop until SIGTERM/SIGINT: reloads, STATUS updates, watchdog pings."""
        interval = watchdog_interval()
        next_ping = time.monotonic()
        while not self._stop:
            self._last_tick = time.monotonic()
            if self._reload:
                self._reload = False
                self.reload()
            self._update_watcher()
            self._notify_status()
            now = time.monotonic()
            if interval is not None and now >= next_ping:
                ok, reason = self.health()
                if ok:
                    sd_notify("WATCHDOG=1")
                else:
                    # No ping: systemd's WatchdogSec= restarts us, which is what we want.
                    log.error("unhealthy, withholding watchdog ping: %s", reason)
                next_ping = now + interval
            timeout = TICK_SECONDS if interval is None else min(TICK_SECONDS, interval)
            readable, _, _ = select.select([self._wake_r], [], [], timeout)
            if readable:
                os.read(self._wake_r, 4096)
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop serving and watching."""
        sd_notify("STOPPING=1")
        log.info("stopping")
        if self.server is not None:
            self.server.stop()
        if self.unix_server is not None:
            self.unix_server.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None:
            self.worker.stop()   # SIGTERM: the worker stops the probes it started

    def request_stop(self, *_: Any) -> None:
        """Signal-safe: ask the loop to stop."""
        self._stop = True
        self._wake()

    def request_reload(self, *_: Any) -> None:
        """Signal-safe: ask the loop to reload the config."""
        self._reload = True
        self._wake()

    def _wake(self) -> None:
        # os.write is async-signal-safe; Event.set() from a handler could deadlock on its lock.
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads (main thread only)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    # -- reload ---------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config; a bad one is logged and the running one kept."""
        sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        server: AgentHTTPServer | None = None
        try:
            new = load_config(self.config_path).with_overrides(**self.overrides)
            check_web_limits(new)
            # Read again even when unchanged: renewed certificates are picked up here.
            web = load_web_config(self.web_config_path)
            if (new.listen_address, new.max_connections, new.request_timeout_seconds) != (
                    self.config.listen_address, self.config.max_connections,
                    self.config.request_timeout_seconds):
                server = self._make_server(new, web)   # bind first: a failure keeps the old
            else:
                self._make_server_web(new, web)        # validate before touching anything
            if self.worker is not None:
                worker: WorkerInspect | None = self._make_worker(new)
                worker.start()   # type: ignore[union-attr]
                inspect: Inspect = worker   # type: ignore[assignment]
            else:
                worker, inspect = None, self._inspector_factory(new)
        except DriftwatchError as exc:
            if server is not None:
                server.server_close()
            log.error("reload failed, keeping the running configuration: %s", exc)
            sd_notify("READY=1")
            return False
        self.web = web
        if server is not None:
            old, self.server = self.server, server
            server.start()
            if old is not None:
                old.stop()
        elif self.server is not None:
            self.server.set_web(self._make_server_web(new, web))
        if worker is not None and self.worker is not None:
            # The old worker finishes the inspection it runs (a scrape may wait on it).
            old_worker, self.worker = self.worker, worker
            threading.Thread(target=old_worker.stop, kwargs={"graceful": True}, daemon=True,
                             name="driftwatch-worker-retire").start()
        self.cache.set_inspect(inspect, new.min_interval_seconds, new.scrape_wait_seconds)
        logging.getLogger().setLevel(new.log_level.upper())
        self.config = new
        if self.watcher is not None and hasattr(self.watcher, "set_candidate"):
            self.watcher.set_candidate(candidate_predicate(new))
        log.info("configuration reloaded from %s", new.source or "built-in defaults")
        sd_notify("READY=1")
        self._notify_status(force=True)
        return True

    def _make_server_web(self, config: Config, web: WebConfig) -> WebConfig:
        """The web config the TCP server would use (agent.toml's [tls] folded in), checked:
        its TLS files are loaded now."""
        from agent.daemon.server import web_from_agent_tls
        from agent.daemon.webconfig import make_ssl_context
        if web.tls is not None and config.tls.enabled:
            raise ConfigError(f"TLS is configured twice: in {config.source or 'agent.toml'} "
                              f"[tls] and in {web.source}; keep one")
        if web.tls is None and config.tls.enabled:
            web = WebConfig(web_from_agent_tls(config.tls).tls, web.users, web.headers,
                            web.source)
        if web.tls is not None:
            make_ssl_context(web.tls)
        return web

    # -- health, status -------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """Alive = the loop ticks, the server serves, no inspection hangs."""
        if time.monotonic() - self._last_tick > 10 * TICK_SECONDS + 5:
            return False, "main loop stalled"
        if self.server is None or not self.server.is_serving():
            return False, "HTTP server not serving"
        hang_limit = 5 * self.config.probe_timeout_seconds + 60
        running = self.cache.inflight_seconds()
        if running > hang_limit:
            return False, f"inspection running for {running:.0f}s"
        return True, ""

    def status(self, unit: str | None) -> tuple[int, dict[str, Any]]:
        """Body of /status: the (maybe cached) snapshot, optionally one unit."""
        snapshot = self.cache.get()
        agent = {"version": __version__, "config_file": self.config.source,
                 "inspections_total": self.cache.inspections_total,
                 "inspection_failures_total": self.cache.failures_total,
                 "last_error": self.cache.last_error}
        if snapshot is None:
            running = self.cache.running()
            why = (f"no successful inspection yet (the first has run for {running[0]:.0f}s)"
                   if running else "no successful inspection yet")
            return 503, {"error": why, "agent": agent}
        data = snapshot.as_dict()
        data["agent"] = agent
        if unit is not None:
            data["units"] = [u for u in data["units"] if u["unit"] == unit]
            if not data["units"]:
                return 404, {"error": f"unit {unit!r} is not watched", "agent": agent}
        return 200, data

    def _update_watcher(self) -> None:
        if self.watcher is None and self.worker is None:
            return
        snapshot = self.cache.peek()
        units = [u.unit for u in snapshot.units] if snapshot else configured_units(self.config)
        if self.worker is not None:
            self.worker.ensure()   # a worker that died is replaced here, within a tick
            self.worker.set_units(units)
        else:
            self.watcher.set_units(units)

    def _notify_status(self, force: bool = False, ready: bool = False) -> None:
        line = status_line(self.cache.peek(), self.config.listen_address, self.cache.last_error)
        if force or line != self._last_status:
            self._last_status = line
            states = (["READY=1"] if ready else []) + [f"STATUS={line}"]
            sd_notify(*states)


# -- command line -------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Prometheus-style flags."""
    parser = _Parser(prog=PROG, description="driftwatch host agent: exports migration and "
                     "schema drift of gunicorn/Flask units as Prometheus metrics.")
    parser.add_argument("--config.file", dest="config_file", metavar="PATH", default=None,
                        help="TOML config (default /etc/driftwatch/agent.toml, optional)")
    parser.add_argument("--web.listen-address", dest="listen_address", metavar="[HOST]:PORT",
                        help="overrides listen_address, e.g. :9410 or 127.0.0.1:9410")
    parser.add_argument("--web.config.file", dest="web_config_file", metavar="PATH",
                        default=None, help="exporter-toolkit web config (YAML): TLS, "
                        "basic_auth_users, http_server_config.headers; re-read on SIGHUP")
    parser.add_argument("--web.unix-socket", dest="unix_socket", metavar="PATH",
                        default=DEFAULT_UNIX_SOCKET, help="root-only socket agentctl status "
                        f"prefers (default {DEFAULT_UNIX_SOCKET}; '' to disable)")
    parser.add_argument("--log.level", dest="log_level", choices=LOG_LEVELS,
                        help="overrides log_level")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    # Tests only: a 'module:callable' taking the Config and returning the inspect callable.
    parser.add_argument("--inspector", default=DEFAULT_INSPECTOR, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_factory(spec: str) -> FactoryRef:
    """'module:callable' as a FactoryRef; the module must exist (its import is left to the
    worker)."""
    module_name = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot load inspector {spec!r}: {exc}") from None
    if found is None:
        raise ConfigError(f"cannot load inspector {spec!r}: no module named {module_name!r}")
    return FactoryRef(spec)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of driftwatch-agent; returns the exit code."""
    args = parse_args(argv)
    setup_logging(args.log_level or "info")
    overrides = {"listen_address": args.listen_address, "log_level": args.log_level}
    try:
        config = load_config(args.config_file).with_overrides(**overrides)
        logging.getLogger().setLevel(config.log_level.upper())
        daemon = Daemon(config, load_factory(args.inspector), args.config_file, overrides,
                        web_config_path=args.web_config_file, unix_socket=args.unix_socket,
                        worker=True)
        # Before start(): a SIGTERM or SIGHUP right after READY=1 must already be handled.
        daemon.install_signal_handlers()
        daemon.start()
    except DriftwatchError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    code = daemon.run()
    # Here, in the agent's own process only: every child is a probe (or its helpers) the
    # agent started; a Daemon embedded elsewhere (tests) must not end its host's children.
    stop_children()
    return code
