"""Workload certificates: one per local service account, renewed at half-life.

As Istio's ztunnel (and the reference facts): the key is ECDSA P-256, the CSR carries the
SPIFFE id as its one URI SAN and no CN; a certificate is renewed when half of its lifetime has
passed; a failed fetch is retried with exponential backoff (doubling from 1 s, capped at
150 s) while the still-valid certificate keeps being served. A refusal (e.g. node
authorization: "no instances of SA on node N") is logged with the CA's reason and retried on
the same schedule, since the pod that makes it legitimate may just not be known to istiod yet.
When the mesh root changes (the root certificate file was rewritten, or the CA answers a new
trust bundle: istiod restarted with another CA) every certificate is renewed at once
(``renew_all``), and the trust bundle follows the CA's answer.

The timing decisions are the pure functions ``renewal_delay`` and ``next_backoff``; the
``CertificateManager`` is a thin Trio driver around them.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ambient_api.discovery import CertificateResponse
from ambient_api.identity import SpiffeId
from ambient_dataplane import tls
from ambient_dataplane.controlplane import CaRefused, CaUnavailable
from ambient_dataplane.tls import CertifiedKey

log = structlog.get_logger()

DEFAULT_BACKOFF_INITIAL = 1.0
DEFAULT_BACKOFF_CAP = 150.0


def new_key_and_csr(identity: SpiffeId) -> tuple[str, str]:
    """A fresh ECDSA P-256 key and a CSR for it: one URI SAN (the SPIFFE id), empty subject."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def renewal_delay(not_before: datetime, not_after: datetime, now: datetime) -> float:
    """Seconds from ``now`` (the moment the certificate arrived) until half of its usable
    lifetime has passed (>= 0). Usable life starts at ``now`` when the CA backdated
    ``not_before`` for clock skew: that minute cannot be used, and counting it would make a
    short-lived certificate arrive already "past half-life"."""
    start = max(not_before, now)
    half_life = start + (not_after - start) / 2
    return max(0.0, (half_life - now).total_seconds())


def next_backoff(
    previous: float | None,
    *,
    initial: float = DEFAULT_BACKOFF_INITIAL,
    cap: float = DEFAULT_BACKOFF_CAP,
) -> float:
    """The wait before the next retry: ``initial`` after the first failure, then doubling,
    never more than ``cap``."""
    if previous is None:
        return min(initial, cap)
    return min(previous * 2, cap)


class CertificateSigner(Protocol):
    """What the manager needs from the CA client (``ambient_dataplane.controlplane.CaClient``)."""

    async def sign(self, csr_pem: str, ttl_seconds: int | None = None) -> CertificateResponse:
        ...


@dataclass(frozen=True)
class CertificateInfo:
    """What the config dump shows about one certificate of a chain."""

    serial_number: str
    valid_from: datetime
    expiration_time: datetime
    subject_alt_names: tuple[str, ...]

    def to_dump(self) -> dict[str, Any]:
        return {
            "serialNumber": self.serial_number,
            "validFrom": _iso(self.valid_from),
            "expirationTime": _iso(self.expiration_time),
            "subjectAltNames": list(self.subject_alt_names),
        }


def describe_certificate(pem: str) -> CertificateInfo:
    """Parse one PEM certificate into the fields the dump and the scheduler need."""
    cert = x509.load_pem_x509_certificate(pem.encode())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(
            [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
            + [str(v) for v in san.get_values_for_type(x509.DNSName)]
            + [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        )
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(
        serial_number=format(cert.serial_number, "x"),
        valid_from=cert.not_valid_before_utc,
        expiration_time=cert.not_valid_after_utc,
        subject_alt_names=names,
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Entry:
    """The manager's bookkeeping for one wanted identity."""

    identity: SpiffeId
    # Created up front so that dropping the identity before its task runs still stops it.
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cert: CertifiedKey | None = None
    chain_info: tuple[CertificateInfo, ...] = ()
    last_error: str | None = None
    changed: trio.Event = field(default_factory=trio.Event)
    renewal_requested: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_until_renewal(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if a renewal is requested meanwhile."""
        with trio.move_on_after(delay):
            await self.renewal_requested.wait()
        self.renewal_requested = trio.Event()


RotationHook = Callable[[SpiffeId, CertifiedKey], None]


class CertificateManager:
    """Keeps a valid certificate for every wanted local identity.

    ``set_wanted`` is called after each config change with ``state.local_identities(node)``;
    ``run`` (started in the proxy's nursery) keeps one task per wanted identity. Each
    successful fetch calls the ``on_rotated`` hooks so the proxy can rebuild SSL contexts.
    """

    def __init__(
        self,
        ca: CertificateSigner,
        *,
        clock: Callable[[], datetime] = _utc_now,
        requested_ttl: int | None = None,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        bootstrap_trust_bundle: Iterable[str] = (),
        on_rotated: RotationHook | None = None,
    ) -> None:
        self._ca = ca
        self._clock = clock
        self._requested_ttl = requested_ttl
        self._backoff_initial = backoff_initial
        self._backoff_cap = backoff_cap
        self._trust_bundle = list(bootstrap_trust_bundle)
        self._trust_bundle_from_ca = False  # still the bootstrap roots
        self._rotation_hooks: list[RotationHook] = [on_rotated] if on_rotated else []
        self._entries: dict[SpiffeId, _Entry] = {}
        self._nursery: trio.Nursery | None = None

    # -- configuration -------------------------------------------------------------------

    def add_rotation_hook(self, hook: RotationHook) -> None:
        """Called (synchronously) with the identity and its new certificate on every fetch."""
        self._rotation_hooks.append(hook)

    def set_wanted(self, identities: Iterable[SpiffeId]) -> None:
        """Start maintaining new identities; stop and forget the ones no longer wanted."""
        wanted = set(identities)
        for identity in list(self._entries):
            if identity not in wanted:
                entry = self._entries.pop(identity)
                entry.cancel_scope.cancel()
                entry.notify()
                log.info("certificate dropped", identity=str(identity))
        for identity in sorted(wanted - set(self._entries)):
            entry = _Entry(identity)
            self._entries[identity] = entry
            if self._nursery is not None:
                self._nursery.start_soon(self._maintain, entry)

    def wanted(self) -> set[SpiffeId]:
        return set(self._entries)

    def renew_all(self, reason: str, *, except_for: SpiffeId | None = None) -> None:
        """Fetch every certificate again now, without waiting for its half-life or backoff
        (the mesh root changed: leaves of the old root stop working once peers drop it)."""
        renewing = sorted(i for i in self._entries if i != except_for)
        if not renewing:
            return
        log.info("certificates renewing", reason=reason, identities=[str(i) for i in renewing])
        for identity in renewing:
            self._entries[identity].renewal_requested.set()

    # -- the driver ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Maintain certificates until cancelled. Started as soon as the tasks are spawned;
        use ``wait_for`` (or readiness) to wait for actual certificates."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for entry in self._entries.values():
                    nursery.start_soon(self._maintain, entry)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _maintain(self, entry: _Entry) -> None:
        with entry.cancel_scope:
            backoff: float | None = None
            while True:
                try:
                    cert, info = await self._fetch(entry.identity)
                except (CaRefused, CaUnavailable) as exc:
                    backoff = next_backoff(
                        backoff, initial=self._backoff_initial, cap=self._backoff_cap
                    )
                    entry.last_error = (
                        f"refused ({exc.status}): {exc.reason}"
                        if isinstance(exc, CaRefused)
                        else exc.reason
                    )
                    entry.notify()
                    log.warning(
                        "certificate fetch failed",
                        identity=str(entry.identity),
                        error=entry.last_error,
                        retry_in=backoff,
                        keeping_valid_certificate=self._valid(entry),
                    )
                    await entry.wait_until_renewal(backoff)
                    continue
                self._install(entry, cert, info)
                delay = renewal_delay(info[0].valid_from, info[0].expiration_time, self._clock())
                if delay > 0:
                    backoff = None
                else:
                    # The CA handed out a certificate that is already expired (its clock is
                    # behind ours): renew, but without hammering the CA.
                    delay = backoff = next_backoff(
                        backoff, initial=self._backoff_initial, cap=self._backoff_cap
                    )
                    log.warning(
                        "certificate issued already expired",
                        identity=str(entry.identity),
                        renew_in=delay,
                    )
                await entry.wait_until_renewal(delay)

    async def _fetch(
        self, identity: SpiffeId
    ) -> tuple[CertifiedKey, tuple[CertificateInfo, ...]]:
        key_pem, csr_pem = new_key_and_csr(identity)
        response = await self._ca.sign(csr_pem, self._requested_ttl)
        try:
            info = tuple(describe_certificate(pem) for pem in response.cert_chain)
            cert = CertifiedKey.from_pem(response.cert_chain, key_pem)
        except ValueError as exc:
            raise CaUnavailable(f"CA answered an unusable certificate chain: {exc}") from None
        if str(identity) not in info[0].subject_alt_names:
            raise CaUnavailable(
                f"CA answered a certificate for {info[0].subject_alt_names}, not {identity}"
            )
        if response.trust_bundle:
            bundle = list(response.trust_bundle)
            if self._trust_bundle_from_ca and bundle != self._trust_bundle:
                # The CA's roots changed (a new CA): the other certificates chain to roots
                # peers are about to stop trusting.
                self.renew_all("the CA answered a new trust bundle", except_for=identity)
            self._trust_bundle, self._trust_bundle_from_ca = bundle, True
        return cert, info

    def _install(
        self, entry: _Entry, cert: CertifiedKey, info: tuple[CertificateInfo, ...]
    ) -> None:
        entry.cert = cert
        entry.chain_info = info
        entry.last_error = None
        entry.notify()
        log.info(
            "certificate issued",
            identity=str(entry.identity),
            serial=info[0].serial_number,
            not_after=_iso(info[0].expiration_time),
        )
        for hook in self._rotation_hooks:
            try:
                hook(entry.identity, cert)
            except Exception:
                log.exception("certificate rotation hook failed", identity=str(entry.identity))

    def _valid(self, entry: _Entry) -> bool:
        if entry.cert is None or not entry.chain_info:
            return False
        leaf = entry.chain_info[0]
        return leaf.valid_from <= self._clock() < leaf.expiration_time

    # -- queries -------------------------------------------------------------------------

    def current(self, identity: SpiffeId) -> CertifiedKey | None:
        """The identity's certificate if it is wanted and still valid, else None."""
        entry = self._entries.get(identity)
        if entry is None or not self._valid(entry):
            return None
        return entry.cert

    async def wait_for(self, identity: SpiffeId, timeout: float) -> CertifiedKey:
        """Wait until the identity has a valid certificate; TimeoutError names the last
        failure. Raises KeyError if the identity is not wanted."""
        if (cert := self.current(identity)) is not None:
            return cert  # the common case: no cancel scope (and deadline) to set up
        with trio.move_on_after(timeout):
            while True:
                entry = self._entries.get(identity)
                if entry is None:
                    raise KeyError(f"no certificate is wanted for {identity}")
                cert = self.current(identity)
                if cert is not None:
                    return cert
                await entry.changed.wait()
        raise TimeoutError(
            f"no certificate for {identity} after {timeout}s: {self.state(identity)}"
        )

    def state(self, identity: SpiffeId) -> str:
        """Istio's certificate states: Available, Initializing, Unavailable: <reason>."""
        entry = self._entries.get(identity)
        if entry is None:
            return "Unavailable: not a local identity"
        if self._valid(entry):
            return "Available"
        if entry.last_error is not None:
            return f"Unavailable: {entry.last_error}"
        if entry.cert is not None:
            return "Unavailable: certificate expired"
        return "Initializing"

    def missing(self) -> list[SpiffeId]:
        """Wanted identities without a valid certificate (for readiness)."""
        return sorted(i for i, entry in self._entries.items() if not self._valid(entry))

    @property
    def trust_bundle(self) -> list[str]:
        """The roots from the latest CA answer (initially the bootstrap roots)."""
        return list(self._trust_bundle)

    def dump(self) -> list[dict[str, Any]]:
        """The ``certificates`` section of ``/config_dump``, shaped like Istio's."""
        return [
            {
                "identity": str(identity),
                "state": self.state(identity),
                "certChain": [info.to_dump() for info in entry.chain_info],
            }
            for identity, entry in sorted(self._entries.items())
        ]


class TlsContexts:
    """SSL contexts per identity, rebuilt only when the certificate or the bundle changes
    (building one writes key material to a private temp file, too slow per connection)."""

    def __init__(self, certs: CertificateManager) -> None:
        self._certs = certs
        self._cache: dict[tuple[str, SpiffeId], tuple[tuple[Any, ...], ssl.SSLContext]] = {}

    def _get(self, side: str, identity: SpiffeId) -> ssl.SSLContext | None:
        cert = self._certs.current(identity)
        if cert is None:
            return None
        bundle = tuple(self._certs.trust_bundle)
        fingerprint = (cert.serial, bundle)
        cached = self._cache.get((side, identity))
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        build = tls.server_context if side == "server" else tls.client_context
        context = build(cert, list(bundle))
        self._cache[(side, identity)] = (fingerprint, context)
        return context

    def server(self, identity: SpiffeId) -> ssl.SSLContext | None:
        return self._get("server", identity)

    def client(self, identity: SpiffeId) -> ssl.SSLContext | None:
        return self._get("client", identity)
