"""The istiod_lite process: ``python -m istiod_lite --config-dir DIR --state-dir DIR
--bootstrap-tokens FILE``.

Wires the pieces: the mesh CA, istiod's own serving certificate, the file source feeding
translation into the resource store, and the HTTP/2 server. Runs until SIGINT/SIGTERM, then
ends every discovery stream and lets in-flight requests finish (a second signal stops at once).
"""

from __future__ import annotations

import gc
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from ambient_api.identity import SpiffeId
from ambient_common.errors import describe, leaf_exceptions
from ambient_common.files import write_atomically
from ambient_common.logging import configure_logging
from istiod_lite.auth import (
    Authenticator,
    BootstrapTokenAuthenticator,
    BootstrapTokenFileError,
    load_bootstrap_tokens,
)
from istiod_lite.ca import CaConfigError, CertificateAuthority
from istiod_lite.config import IstiodConfig, parse_args
from istiod_lite.discovery import ResourceStore
from istiod_lite.metrics import IstiodMetrics
from istiod_lite.server import IstiodApp, hypercorn_config, serve
from istiod_lite.sources.file import FileSource
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate import IncrementalTranslator, MeshConfig, PolicyError

log = structlog.get_logger()

SnapshotHook = Callable[[ClusterObjects], Awaitable[None]]
BackgroundTask = Callable[..., Awaitable[None]]


class Source(Protocol):
    async def run(
        self, send: trio.MemorySendChannel[ClusterObjects], *, task_status: Any = ...
    ) -> None: ...


SERVING_DNS_NAMES = ("istiod.istio-system.svc", "istiod")
SERVING_KEY_FILE = "istiod-key.pem"
SERVING_CHAIN_FILE = "istiod-cert-chain.pem"
# Published for proxies: the trust bundle they verify istiod (and each other) with.
ROOT_CERT_FILE = "root-cert.pem"
CA_SUBDIR = "ca"


class StartupError(Exception):
    """istiod_lite cannot start; the message says what to fix."""


@dataclass
class RunningIstiod:
    """Handed to ``nursery.start(run_istiod, config)``'s caller."""

    config: IstiodConfig
    store: ResourceStore
    app: IstiodApp
    url: str
    root_cert_path: Path
    _stop: trio.Event = field(default_factory=trio.Event)

    def shutdown(self) -> None:
        """Begin a graceful shutdown; ``run_istiod`` returns once it is done."""
        self._stop.set()


def load_ca(config: IstiodConfig) -> CertificateAuthority:
    try:
        if config.ca_plugin_dir is not None:
            return CertificateAuthority.from_plugin_dir(
                config.ca_plugin_dir,
                trust_domain=config.trust_domain,
                default_ttl=config.cert_ttl,
                max_ttl=config.max_cert_ttl,
            )
        return CertificateAuthority.self_signed(
            config.trust_domain,
            config.state_dir / CA_SUBDIR,
            default_ttl=config.cert_ttl,
            max_ttl=config.max_cert_ttl,
        )
    except CaConfigError as error:
        raise StartupError(f"cannot load the CA: {error}") from None


def prepare_state_dir(config: IstiodConfig, ca: CertificateAuthority) -> tuple[Path, Path, Path]:
    """Issue istiod's serving certificate and publish the trust bundle.
    Returns (key file, chain file, root-cert.pem)."""
    key_pem, chain = ca.issue_serving_certificate(
        list(SERVING_DNS_NAMES),
        [] if config.listen_host in ("0.0.0.0", "::") else [config.listen_host],
        SpiffeId(config.trust_domain, "istio-system", "istiod"),
    )
    key_path = config.state_dir / SERVING_KEY_FILE
    chain_path = config.state_dir / SERVING_CHAIN_FILE
    root_path = config.state_dir / ROOT_CERT_FILE
    write_atomically(key_path, key_pem)
    write_atomically(chain_path, "".join(chain))
    write_atomically(root_path, "".join(ca.trust_bundle), 0o644)
    return key_path, chain_path, root_path


async def feed_store(
    receive: trio.MemoryReceiveChannel[ClusterObjects],
    store: ResourceStore,
    mesh: MeshConfig,
    on_snapshot: SnapshotHook | None = None,
    metrics: IstiodMetrics | None = None,
) -> None:
    """Translate every snapshot of the cluster into the store; a failed translation keeps the
    last good resource set (and is logged) instead of serving a partial one. The policy
    translation errors of what is served go to ``metrics`` and, when they change, the log."""
    translator = IncrementalTranslator(mesh)
    served_errors: tuple[PolicyError, ...] = ()
    async for objects in receive:
        try:
            resources = translator.translate(objects)
        except Exception:
            log.exception("translation failed; still serving the previous resources")
            continue
        first = not store.initialized
        store.replace_all(resources)
        if translator.policy_errors != served_errors:
            served_errors = translator.policy_errors
            log_policy_errors(served_errors)
        if metrics is not None:
            metrics.record_translation(served_errors)
        if first:
            # The first load is most of the heap (every object and resource; unchanged ones
            # are reused from then on). Frozen, the collector no longer walks it: a full
            # collection of a 10,000-pod heap is a >100 ms pause that lands on whichever
            # change propagates next.
            gc.freeze()
        if on_snapshot is not None:
            await on_snapshot(objects)


def log_policy_errors(errors: Sequence[PolicyError]) -> None:
    """The totals, once per change (each error was logged as it was found)."""
    if errors:
        log.warning(
            "serving policies that failed closed",
            errors=len(errors), policies=sorted({error.policy for error in errors}),
        )
    else:
        log.info("no policy translation errors")


@dataclass
class ControlPlaneParts:
    """What differs between the embedded mode and Kubernetes; the rest of istiod is one."""

    ca: CertificateAuthority
    authenticator: Authenticator
    source: Source
    on_snapshot: SnapshotHook | None = None
    background: BackgroundTask | None = None  # started after the server listens


def file_mode_parts(config: IstiodConfig) -> ControlPlaneParts:
    assert config.config_dir is not None and config.bootstrap_tokens is not None
    try:
        authenticator = BootstrapTokenAuthenticator(
            load_bootstrap_tokens(config.bootstrap_tokens), trust_domain=config.trust_domain
        )
    except BootstrapTokenFileError as error:
        raise StartupError(f"--bootstrap-tokens: {error}") from None
    return ControlPlaneParts(
        load_ca(config), authenticator,
        FileSource(config.config_dir, poll_interval=config.poll_interval),
    )


async def kubernetes_mode_parts(config: IstiodConfig) -> ControlPlaneParts:
    from istiod_lite.kube.client import KubeConfigError
    from istiod_lite.kube.runtime import kubernetes_parts

    try:
        parts = await kubernetes_parts(config)
    except (KubeConfigError, CaConfigError) as error:
        raise StartupError(str(error)) from None
    duties = parts.leader_duties
    return ControlPlaneParts(parts.ca, parts.authenticator, parts.source,
                             duties.on_snapshot, duties.run)


async def run_istiod(
    config: IstiodConfig,
    *,
    task_status: trio.TaskStatus[RunningIstiod] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run istiod_lite until ``RunningIstiod.shutdown()`` (or cancellation). Started means:
    the first resource set is loaded and the server is listening."""
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise StartupError(f"cannot create --state-dir {config.state_dir}: {error}") from None
    parts = (
        await kubernetes_mode_parts(config) if config.kubernetes else file_mode_parts(config)
    )
    ca = parts.ca
    key_path, chain_path, root_path = prepare_state_dir(config, ca)
    store = ResourceStore()
    metrics = IstiodMetrics()
    app = IstiodApp(
        store, ca, parts.authenticator, max_cert_ttl=config.max_cert_ttl, metrics=metrics,
        root_namespace=config.mesh.root_namespace,
    )

    async with trio.open_nursery() as nursery:
        send, receive = trio.open_memory_channel[ClusterObjects](1)
        nursery.start_soon(feed_store, receive, store, config.mesh, parts.on_snapshot, metrics)
        await nursery.start(parts.source.run, send)
        await store.wait_initialized()

        hyper = hypercorn_config(config.listen_host, config.listen_port, chain_path, key_path)
        server_done = trio.Event()

        async def serve_then_signal(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(app, hyper, task_status=task_status)
            finally:
                server_done.set()

        try:
            binds = await nursery.start(serve_then_signal)
        except* OSError as group:
            reason = describe(group)
            raise StartupError(f"cannot listen on {config.listen}: {reason}") from None
        if parts.background is not None:
            await nursery.start(parts.background)
        url = binds[0] if binds else f"https://{config.listen}"
        running = RunningIstiod(config, store, app, url, root_path)
        log.info(
            "istiod_lite ready",
            url=url,
            trust_domain=config.trust_domain,
            source="kubernetes" if config.kubernetes else str(config.config_dir),
            root_cert=str(root_path),
            resources=len(store.versions()),
        )
        task_status.started(running)
        await running._stop.wait()
        log.info("istiod_lite shutting down")
        app.begin_shutdown()
        await server_done.wait()
        nursery.cancel_scope.cancel()
    log.info("istiod_lite stopped")


async def _handle_signals(running: RunningIstiod, cancel_scope: trio.CancelScope) -> None:
    """First SIGINT/SIGTERM: graceful shutdown. Second: stop now."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if running._stop.is_set():
                log.warning("second signal, stopping now", signal=name)
                cancel_scope.cancel()
                return
            log.info("signal received, shutting down gracefully", signal=name)
            running.shutdown()


async def main_async(config: IstiodConfig) -> None:
    finished = trio.Event()

    async def run_then_finish(task_status: trio.TaskStatus[RunningIstiod]) -> None:
        try:
            await run_istiod(config, task_status=task_status)
        finally:
            finished.set()

    async with trio.open_nursery() as nursery:
        running: RunningIstiod = await nursery.start(run_then_finish)
        nursery.start_soon(_handle_signals, running, nursery.cancel_scope)
        await finished.wait()
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging(config.log_format, config.log_level)
    exit_code = 0
    try:
        trio.run(main_async, config)
    except* StartupError as group:
        for error in leaf_exceptions(group):  # nested nurseries nest the groups
            log.error("istiod_lite cannot start", error=str(error))
        exit_code = 1
    except* KeyboardInterrupt:
        exit_code = 130
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
