"""Serving: the HTTP app (uvicorn) and the gRPC server in one process and one
event loop, both over one Engine.

`run_gateway` is what `bon-gateway serve` calls; `serve_gateway` runs the two
fronts over an engine built elsewhere (tests, embedding); `build_grpc_server`
builds the gRPC side with health and reflection wired in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bon_gateway.api.grpc_decode import add_best_of_n_to_server
from bon_gateway.api.grpc_guard import GuardInterceptor
from bon_gateway.api.grpc_service import BestOfNService
from bon_gateway.api.guard import Guard
from bon_gateway.api.http_app import build_app
from bon_gateway.config import ConfigError, GatewayConfig, ServerConfig, TlsConfig
from bon_gateway.engine.engine import Engine
from bon_gateway.logs import log_phase
from bon_gateway.metrics import Metrics
from bon_gateway.v1 import best_of_n_pb2 as pb

__all__ = ["GrpcFront", "build_grpc_server", "event_loop_factory", "run_gateway", "serve_gateway"]

log = logging.getLogger("bon_gateway.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BestOfN"].full_name
# Bounded grace for in-flight requests at shutdown (SIGTERM), per front.
SHUTDOWN_GRACE_S = 30.0


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for the gateway where it is installed (not on Windows); None
    (asyncio's own loop) otherwise. grpc.aio and uvicorn both run on it."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _http_protocol(config: GatewayConfig, metrics: Metrics) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with the gateway's head timer, head bound and connection
    table (api/http_protocol.py); h11 where httptools is missing, with only the head bound."""
    try:
        from bon_gateway.api.http_protocol import guarded_protocol
    except ImportError:
        log_phase(log, "http_parser", logging.WARNING, parser="h11", bounds="max_header_bytes only")
        return "h11"
    server = config.server
    limit = _connection_limit(server, config.generator.max_connections)
    return guarded_protocol(server.limits, limit, metrics)


# Descriptors kept free of HTTP connections: the upstream pool, gRPC, the workers' pipes.
_FD_RESERVE = 128


def _connection_limit(server: ServerConfig, upstream_connections: int = 0) -> int:
    """`max_connections`, or fewer when the process may not open that many descriptors
    (after raising its soft limit toward the hard one): a connection table past the
    descriptor limit makes accept() fail, and then nobody is served, /health included."""
    wanted = server.limits.max_connections
    try:
        import resource
    except ImportError:  # not on Windows
        return wanted
    needed = wanted + upstream_connections + _FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    limit = max(1, soft - upstream_connections - _FD_RESERVE)
    log_phase(log, "http_connections_capped", logging.WARNING, max_connections=limit, fd_limit=soft)
    return limit


@dataclass
class GrpcFront:
    """A grpc.aio server with health and reflection, plus the task keeping health current."""

    server: grpc.aio.Server
    port: int
    engine: Engine
    health: health.aio.HealthServicer
    _watch: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self) -> None:
        await self.server.start()
        self._watch = asyncio.create_task(self._watch_ready(), name="grpc-health-watch")

    async def _watch_ready(self) -> None:
        # Woken by the pool (a worker up or down) and the upstream balancer (an
        # ejection, or its cooldown ending); readiness is re-read then, never polled.
        changed = asyncio.Event()
        self.engine.on_readiness_change(changed.set)
        serving: bool | None = None
        while True:
            changed.clear()
            ready = self.engine.ready()
            if ready != serving:
                serving = ready
                await self.set_serving(ready)
                log_phase(log, "grpc_health", status="SERVING" if ready else "NOT_SERVING")
            await changed.wait()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace_s: float | None = SHUTDOWN_GRACE_S) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        # Tell load balancers first, then drain.
        await self.set_serving(False)
        await self.server.stop(grace_s)


def _server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    assert tls.cert_file is not None and tls.key_file is not None
    try:
        with open(tls.key_file, "rb") as key, open(tls.cert_file, "rb") as cert:
            pair = (key.read(), cert.read())
    except OSError as err:
        raise ConfigError(f"server.tls: cannot read {err.filename}: {err.strerror}") from None
    return grpc.ssl_server_credentials([pair])


def build_grpc_server(
    engine: Engine, metrics: Metrics, port: int, host: str = "127.0.0.1", guard: Guard | None = None
) -> GrpcFront:
    """A BestOfN grpc.aio server bound to host:port (0 = a free port); call `start()`.

    Health reports NOT_SERVING until `engine.ready()`; reflection lists BestOfN and Health.
    `guard` (shared with HTTP when given) checks keys, rates and the in-flight bound;
    TLS is on when `server.tls` names a cert and key.
    """
    server_config = engine.config.server
    guard = guard if guard is not None else Guard.from_config(server_config)
    max_message = server_config.limits.max_body_bytes
    server = grpc.aio.server(
        interceptors=[GuardInterceptor(guard, metrics)],
        options=[
            # Bigger messages are refused by gRPC itself (RESOURCE_EXHAUSTED) before decoding.
            ("grpc.max_receive_message_length", max_message),
            # gRPC turns SO_REUSEPORT on by default: a second gateway on the same port would
            # start and take part of the traffic. Off, a taken port fails start-up.
            ("grpc.so_reuseport", 0),
        ],
    )
    # Not the generated helper: its deserializers' DecodeError (bad UTF-8) would be UNKNOWN.
    add_best_of_n_to_server(BestOfNService(engine, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if port:
        _check_port_free(host, port)
    try:
        if server_config.tls.enabled:
            bound = server.add_secure_port(address, _server_credentials(server_config.tls))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"cannot listen for gRPC on {address}: {err}") from None
    return GrpcFront(server=server, port=bound, engine=engine, health=health_servicer)


def _check_port_free(host: str, port: int) -> None:
    """Raise OSError naming server.grpc_port when host:port is taken (before gRPC logs its own error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise OSError(
                f"cannot listen for gRPC on {host}:{port}: {err.strerror} (server.grpc_port / --grpc-port)"
            ) from None


class _UvicornServer(uvicorn.Server):
    # serve_gateway owns SIGTERM/SIGINT for both fronts; uvicorn's own handling
    # would re-raise the signal after shutdown and kill the process non-zero.
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


def _install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set `stop`; returns the undo. Only the main thread gets signals."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)

    def undo() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)

    return undo


async def serve_gateway(
    config: GatewayConfig,
    engine: Engine,
    metrics: Metrics,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[int, int], None] | None = None,
) -> None:
    """Serve HTTP and gRPC over `engine` until SIGTERM/SIGINT or `stop` is set.

    Ports 0 pick free ports; `on_started(http_port, grpc_port)` reports them once
    both fronts accept connections. In-flight requests get a bounded grace at
    shutdown. The engine is not closed here: whoever built it closes it.
    """
    metrics.initialise(config)  # every series with known labels at 0 before the first scrape
    stop = stop or asyncio.Event()
    host = config.server.host
    tls = config.server.tls
    # One guard for both fronts: the in-flight bound and the key buckets are shared.
    guard = Guard.from_config(config.server)
    uv_config = uvicorn.Config(
        build_app(engine, metrics, guard),
        host=host,
        port=config.server.http_port,
        log_level=config.server.log_level.lower(),
        access_log=False,  # request lines carry no secrets, but one per request drowns the phase logs
        lifespan="off",
        http=_http_protocol(config, metrics),
        # No WebSocket routes: an upgrade would hand the connection to a protocol outside
        # the connection table (which would then never see it close).
        ws="none",
        # Used only without httptools (h11): its bound on a request head.
        h11_max_incomplete_event_size=config.server.limits.max_header_bytes,
        timeout_graceful_shutdown=max(1, round(config.server.shutdown_grace_s)),
        timeout_keep_alive=config.server.http_keep_alive_s,
        ssl_certfile=tls.cert_file,
        ssl_keyfile=tls.key_file,
    )
    http = _UvicornServer(uv_config)
    # gRPC binds first: it raises on a taken port, while uvicorn's bind exits the process.
    grpc_front = build_grpc_server(engine, metrics, config.server.grpc_port, host, guard)
    sock = uv_config.bind_socket()
    # uvicorn makes the listening socket inheritable (for its own multi-process
    # mode, unused here). uvloop's subprocesses (the reward workers) keep
    # inherited descriptors open, so a worker would hold the listener: after
    # SIGTERM the kernel would still accept connections nobody serves.
    sock.set_inheritable(False)
    # uvicorn's socket is made with proto 0, so asyncio does not set TCP_NODELAY on
    # the connections it accepts (it checks proto == IPPROTO_TCP). Without it, a
    # keep-alive client waits ~40 ms per response (Nagle vs delayed ACK: uvicorn
    # writes headers and body separately). Linux copies the option from the
    # listening socket to the accepted ones.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    http_port = sock.getsockname()[1]
    undo_signals = _install_signal_handlers(stop)
    http_task: asyncio.Task[None] | None = None
    try:
        await grpc_front.start()
        log_phase(log, "grpc_listening", address=f"{host}:{grpc_front.port}", tls=tls.enabled)
        http_task = asyncio.create_task(http.serve(sockets=[sock]), name="uvicorn")
        while not http.started:
            if http_task.done():
                await http_task  # startup failed: surface its error
                raise RuntimeError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)
        log_phase(log, "http_listening", address=f"{host}:{http_port}", tls=tls.enabled)
        if on_started is not None:
            on_started(http_port, grpc_front.port)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, http_task}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        log_phase(log, "shutdown", grace_s=config.server.shutdown_grace_s)
    finally:
        undo_signals()
        http.should_exit = True
        # Drain both fronts at once: each waits for its own in-flight requests.
        await asyncio.gather(
            grpc_front.stop(config.server.shutdown_grace_s),
            http_task if http_task is not None else asyncio.sleep(0),
            return_exceptions=True,
        )
        sock.close()
        log_phase(log, "stopped")


async def run_gateway(config: GatewayConfig) -> None:
    """`bon-gateway serve`: build the engine, start the reward workers, serve both fronts."""
    # Imported here: the pool spawns worker processes and is the heaviest part
    # of the front; importing this module must stay cheap and torch-free.
    from bon_gateway.generation.upstream import UpstreamClient
    from bon_gateway.scoring.pool import WorkerPool

    # httpx logs every upstream call at INFO: N lines per request would drown
    # the gateway's one line per phase (debug logging keeps them).
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    metrics = Metrics()
    upstream = UpstreamClient(config.generator, metrics)
    pool = WorkerPool(config, metrics)
    engine = Engine(config, upstream, pool, metrics)
    log_phase(
        log,
        "config",
        generator=config.generator.url,
        reward_models=",".join(m.name for m in config.reward_models) or "none",
        loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    stop = asyncio.Event()
    # Serve at once (liveness answers, readiness says "not yet") while the
    # workers load: loading a model takes seconds to minutes.
    serving = asyncio.create_task(serve_gateway(config, engine, metrics, stop=stop), name="serve")
    log_phase(log, "workers_starting")
    starting = asyncio.create_task(pool.start(), name="pool-start")
    try:
        done, _ = await asyncio.wait({serving, starting}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            if (error := starting.exception()) is not None:
                # A pool that cannot start stops the gateway: nothing could be scored.
                log_phase(log, "workers_failed", logging.ERROR, error=getattr(error, "message", error))
                raise error
            log_phase(log, "workers_started", ready=pool.ready())
        await serving
    finally:
        stop.set()
        starting.cancel()
        await asyncio.gather(serving, starting, return_exceptions=True)
        await engine.aclose()
        log_phase(log, "closed")
