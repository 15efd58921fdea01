"""Mutual-TLS contexts for HBONE and the SPIFFE identity checks that replace hostname checks.

Identity in the mesh is the one SPIFFE URI SAN of the peer's leaf certificate; DNS names play no
part, so hostname checking is off and callers verify the identity explicitly after the handshake.
"""

from __future__ import annotations

import contextlib
import operator
import os
import ssl
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ambient_api.identity import InvalidSpiffeId, SpiffeId

ALPN_H2 = "h2"
# TLS 1.2 is only enabled behind an explicit flag; these are its AEAD ECDHE suites.
_TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:" \
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256"


# Ciphertext read from the socket at once: many 16 KB TLS records per wake-up under bulk load.
_SOCKET_READ_SIZE = 256 * 1024
_DEFAULT_RECEIVE_SIZE = 256 * 1024


def write_nowait(fd: int, data: bytes | bytearray | memoryview) -> int:
    """How much of ``data`` the non-blocking socket ``fd`` takes now (0 when it is full)."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


async def read_socket(fd: int, size: int, *, wait_first: bool) -> bytes:
    """Up to ``size`` bytes from the non-blocking socket ``fd`` (b"" at EOF), waiting for data.

    One checkpoint, as any trio receive (the wait, or a yield when data was there at once,
    taken after reading and shielded so that no data is lost to a cancellation).
    ``wait_first``: the last read left the socket empty, so skip the read that would fail.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = wait_first
    if wait_first:
        await trio.lowlevel.wait_readable(fd)
    while True:
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            waited = True
            continue
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data


class TlsStream(trio.abc.Stream):
    """TLS over a trio socket with the ssl module's memory BIOs, lean for the HBONE data path.

    trio.SSLStream hands out one 16 KB record per receive_some and reads the socket 64 KB at
    a time, and every send goes through locks and extra scheduler round trips. Here
    receive_some decrypts every record already read (up to ``max_bytes``) and reads the socket
    256 KB at a time, and ``send_nowait`` encrypts and writes without awaiting, so the HBONE
    session passes bytes on without a task switch; what the socket does not take yet waits
    in ``pending`` for ``flush``. Sending and receiving are cancel-safe (nothing is lost when
    a wait is cancelled). Errors are trio's: BrokenResourceError (with the ssl or OS error as
    its cause) and ClosedResourceError.
    """

    def __init__(
        self, transport: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool
    ) -> None:
        self.transport_stream = transport
        self._fd = transport.socket.fileno()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._unsent = bytearray()  # ciphertext the socket has not taken yet
        self._bytes_sent = 0  # ciphertext the socket took, ever
        self._broken: BaseException | None = None
        self._closed = False
        self._socket_drained = False  # the last read took all the socket had
        self._receiving = False
        self._sending = False
        self._flush_lock = trio.Lock()

    # -- what the handshake negotiated -------------------------------------------------------
    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    def version(self) -> str | None:
        return self._ssl.version()

    @property
    def pending(self) -> int:
        """Ciphertext bytes written but not yet taken by the socket."""
        return len(self._unsent)

    @property
    def bytes_sent(self) -> int:
        """Ciphertext bytes the socket took since the stream was made."""
        return self._bytes_sent

    # -- handshake ---------------------------------------------------------------------------
    async def do_handshake(self) -> None:
        """Run the TLS handshake (its last flight is sent before this returns)."""
        while True:
            self._check_usable()
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._take_outgoing()
                await self.flush()
                await self._read_socket()
                continue
            except (ssl.SSLError, ssl.CertificateError) as exc:
                self._fail(exc)
            self._take_outgoing()
            await self.flush()
            return

    # -- receiving ---------------------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Every plaintext byte decryptable now (up to ``max_bytes``), reading the socket only
        when none is; b"" once the peer sent close_notify."""
        size = _DEFAULT_RECEIVE_SIZE if max_bytes is None else operator.index(max_bytes)
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            self._check_usable()
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False  # a wait already was this call's checkpoint
            while (data := self._decrypt(size)) is None:
                await self._read_socket()
                waited = True
            if self._outgoing.pending:  # e.g. a KeyUpdate answer
                self._take_outgoing()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def _decrypt(self, size: int) -> bytes | bytearray | None:
        """Plaintext now available (b"" at close_notify), or None when more ciphertext is
        needed."""
        if not self._incoming.pending and not self._ssl.pending() and not self._incoming.eof:
            return None
        chunks: list[bytes] = []
        total = 0
        try:
            while total < size:
                chunk = self._ssl.read(size - total)
                if not chunk:
                    break  # close_notify
                chunks.append(chunk)
                total += len(chunk)
                if not self._incoming.pending and not self._ssl.pending():
                    break
        except ssl.SSLWantReadError:
            if not chunks:
                return None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            if not chunks:
                self._fail(exc)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def _read_socket(self) -> None:
        """Move ciphertext from the socket into the TLS object (waiting for it)."""
        try:
            data = await read_socket(self._fd, _SOCKET_READ_SIZE, wait_first=self._socket_drained)
        except OSError as exc:
            self._check_usable()  # closed while waiting: ClosedResourceError
            self._fail(exc)
        self._check_usable()
        self._socket_drained = len(data) < _SOCKET_READ_SIZE
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    # -- sending -----------------------------------------------------------------------------
    def send_nowait(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and write what the socket takes now; the rest stays ``pending``
        until ``flush`` (or a later send) writes it."""
        self._check_usable()
        if data:
            try:
                self._ssl.write(data)
            except (ssl.SSLError, ssl.CertificateError) as exc:
                self._fail(exc)
        self._take_outgoing()

    async def flush(self) -> None:
        """Wait until the socket took every pending byte."""
        if not self._unsent:
            return
        async with self._flush_lock:
            while self._unsent:
                await trio.lowlevel.wait_writable(self._fd)
                self._write_unsent()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self.send_nowait(data)
            if self._unsent:
                await self.flush()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        if self._unsent:
            await trio.lowlevel.wait_writable(self._fd)
        else:
            await trio.lowlevel.checkpoint()

    def _take_outgoing(self) -> None:
        """Write what TLS produced, or queue it behind ciphertext still unsent (the socket was
        full then: ``flush`` writes once it can take more)."""
        ciphertext = self._outgoing.read()
        if self._unsent:
            self._unsent += ciphertext
        elif ciphertext:
            written = self._write(ciphertext)
            if written < len(ciphertext):
                self._unsent += memoryview(ciphertext)[written:]

    def _write_unsent(self) -> None:
        del self._unsent[:self._write(self._unsent)]

    def _write(self, data: bytes | bytearray) -> int:
        """What the socket takes of ``data`` now, without waiting."""
        self._check_usable()
        try:
            written = write_nowait(self._fd, data)
        except OSError as exc:
            self._fail(exc)
        self._bytes_sent += written
        return written

    # -- closing -----------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Send close_notify if the socket takes it now (never waits for it), then close."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._broken is None:
            # close_notify is queued even when unwrap says it wants the peer's (not waited for).
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()
            with contextlib.suppress(trio.BrokenResourceError):
                self._take_outgoing()
        self._closed = True
        await self.transport_stream.aclose()

    def abort(self) -> None:
        """Close at once, without close_notify and without yielding: a refused peer sees the
        connection end only after the caller, in the same step, logged why."""
        if not self._closed:
            self._closed = True
            self.transport_stream.socket.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(str(self._broken)) from self._broken

    def _fail(self, exc: BaseException) -> NoReturn:
        self._broken = exc
        raise trio.BrokenResourceError(str(exc)) from exc


# Anything that exposes the negotiated TLS session (the streams forward to their SSLObject).
TlsConnection = ssl.SSLObject | ssl.SSLSocket | trio.SSLStream[Any] | TlsStream


class CertificateError(ValueError):
    """A certificate or key given to us is unusable; the message says why."""


class PeerIdentityError(Exception):
    """The TLS peer has no acceptable SPIFFE identity; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CertifiedKey:
    """A workload certificate chain (leaf first) with its private key and the leaf's facts."""

    identity: SpiffeId
    chain_pem: tuple[str, ...]
    key_pem: str
    not_before: datetime
    not_after: datetime
    serial: str

    @classmethod
    def from_pem(cls, chain: Sequence[str], key: str) -> CertifiedKey:
        """Build from PEM strings; raises CertificateError when the chain or key is unusable."""
        if not chain:
            raise CertificateError("certificate chain is empty")
        try:
            leaf = x509.load_pem_x509_certificate(chain[0].encode())
        except ValueError as exc:
            raise CertificateError(f"leaf certificate is not valid PEM: {exc}") from exc
        try:
            private_key = serialization.load_pem_private_key(key.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"private key is not valid unencrypted PEM: {exc}") from exc
        public_der = serialization.PublicFormat.SubjectPublicKeyInfo
        if private_key.public_key().public_bytes(
            serialization.Encoding.DER, public_der
        ) != leaf.public_key().public_bytes(serialization.Encoding.DER, public_der):
            raise CertificateError("private key does not match the leaf certificate")
        try:
            identity = certificate_identity(leaf)
        except PeerIdentityError as exc:
            raise CertificateError(f"leaf certificate: {exc.reason}") from exc
        return cls(
            identity=identity,
            chain_pem=tuple(chain),
            key_pem=key,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial=format(leaf.serial_number, "x"),
        )


def certificate_identity(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE URI SAN of ``cert``; PeerIdentityError says what is wrong otherwise."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise PeerIdentityError("certificate has no subjectAltName extension") from None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise PeerIdentityError("certificate has no URI SAN")
    if len(uris) > 1:
        raise PeerIdentityError(f"certificate has {len(uris)} URI SANs, expected exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise PeerIdentityError(f"URI SAN is not a SPIFFE id: {exc}") from exc


def peer_identity(ssl_object: TlsConnection) -> SpiffeId:
    """The verified peer's SPIFFE id (call after the handshake)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    return certificate_identity(x509.load_der_x509_certificate(der))


def verify_peer(ssl_object: TlsConnection, expected: SpiffeId) -> SpiffeId:
    """Check that the peer is exactly ``expected`` (the client's check of a server)."""
    actual = peer_identity(ssl_object)
    if actual != expected:
        raise PeerIdentityError(f"peer identity is {actual}, expected {expected}")
    return actual


def check_trust_domain(identity: SpiffeId, accepted_trust_domains: Collection[str]) -> None:
    """Servers accept clients only from their own (or explicitly federated) trust domains."""
    if identity.trust_domain not in accepted_trust_domains:
        accepted = ", ".join(sorted(accepted_trust_domains)) or "<none>"
        raise PeerIdentityError(
            f"peer trust domain {identity.trust_domain!r} is not accepted (accepted: {accepted})"
        )


def check_alpn(ssl_object: TlsConnection) -> None:
    """HBONE requires h2; a peer that did not negotiate it cannot speak the tunnel."""
    selected = ssl_object.selected_alpn_protocol()
    if selected != ALPN_H2:
        raise PeerIdentityError(f"peer negotiated ALPN {selected!r}, HBONE needs 'h2'")


def describe_tls_error(exc: BaseException) -> str:
    """A one-line reason for a failed handshake (trio wraps ssl errors in BrokenResourceError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            if current.reason == "UNEXPECTED_EOF_WHILE_READING":
                return "peer closed the connection during TLS (it may have refused our certificate)"
            return f"TLS error: {current.reason or current}"
        if isinstance(current, PeerIdentityError):
            return current.reason
        current = current.__cause__ or current.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def server_context(
    cert: CertifiedKey, trust_bundle: Sequence[str], *, allow_tls12: bool = False
) -> ssl.SSLContext:
    """Server side of HBONE: client certificates required and chained to ``trust_bundle``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(context, cert, trust_bundle, allow_tls12)
    # No TLS 1.3 session tickets: no client resumes, and tickets the client never reads (it
    # hangs up first) would turn its close into a TCP reset that can destroy data in flight.
    context.num_tickets = 0
    return context


def client_context(
    cert: CertifiedKey, trust_bundle: Sequence[str], *, allow_tls12: bool = False
) -> ssl.SSLContext:
    """Client side of HBONE: the server identity is checked by verify_peer, not by hostname."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    _configure(context, cert, trust_bundle, allow_tls12)
    return context


def _configure(
    context: ssl.SSLContext, cert: CertifiedKey, trust_bundle: Sequence[str], allow_tls12: bool
) -> None:
    if not trust_bundle:
        raise CertificateError("trust bundle is empty")
    context.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    if allow_tls12:
        context.set_ciphers(_TLS12_CIPHERS)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([ALPN_H2])
    try:
        context.load_verify_locations(cadata="\n".join(trust_bundle))
    except ssl.SSLError as exc:
        raise CertificateError(f"trust bundle is not valid PEM: {exc}") from exc
    with _private_pem_files(cert) as (chain_path, key_path):
        try:
            context.load_cert_chain(chain_path, key_path)
        except ssl.SSLError as exc:
            raise CertificateError(f"cannot load certificate chain and key: {exc}") from exc


@contextmanager
def _private_pem_files(cert: CertifiedKey) -> Iterator[tuple[str, str]]:
    """ssl only loads keys from files: write them 0600 in a 0700 temp dir, removed at once."""
    with tempfile.TemporaryDirectory(prefix="ztunnel-tls-") as directory:
        chain_path = os.path.join(directory, "chain.pem")
        key_path = os.path.join(directory, "key.pem")
        for path, text in ((chain_path, "".join(_ensure_newline(p) for p in cert.chain_pem)),
                           (key_path, cert.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        yield chain_path, key_path


def _ensure_newline(pem: str) -> str:
    return pem if pem.endswith("\n") else pem + "\n"


async def mutual_handshake(
    tls: TlsStream,
    timeout: float,
    check_peer: Callable[[TlsConnection], SpiffeId],
    what: str,
) -> SpiffeId:
    """Handshake, require ALPN h2, and check the peer's SPIFFE id with ``check_peer``.

    Every failure closes the stream and becomes PeerIdentityError with a one-line reason.
    """
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
        check_alpn(tls)
        return check_peer(tls)
    except trio.TooSlowError:
        tls.abort()
        raise PeerIdentityError(f"TLS handshake {what} took longer than {timeout}s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        tls.abort()
        raise PeerIdentityError(describe_tls_error(exc)) from exc
    except PeerIdentityError:
        tls.abort()
        raise
