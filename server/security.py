"""TLS, mutual TLS and bearer tokens on the gRPC port, and TLS on /metrics.

`Security.from_config()` checks the options and reads every file once, so a bad configuration
stops start-up with one line. Files are then watched: a changed certificate or key is served on
new connections (gRPC asks `CertificateFiles.fetch` at every TLS handshake), a changed token
file applies to the next call. Files are compared by a cheap `stat` at most every
CHECK_SECONDS, which also follows the symlink swap Kubernetes does when a secret changes. A file
that is missing or invalid while it is being replaced keeps the last good content in use.

Tokens: every call except health, ServerLive and ServerReady must carry the metadata
`authorization: Bearer <token>` with a token from the file. Tokens are kept only as SHA-256
digests, compared in constant time, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
import grpc.aio
from convserve.client.credentials import check_key_pair, read_pem
from convserve.server.wire import run_first

log = logging.getLogger("convserve.server")
T = TypeVar("T")

CHECK_SECONDS = 1.0  # how often watched files are compared (one stat per file)
HANDSHAKE_SECONDS = 10.0  # /metrics over TLS: longest wait for a client's TLS handshake
# Calls that stay open without a token: probes and load balancers must reach them.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
REFUSALS = {
    "missing": "this server needs a token: send the metadata 'authorization: Bearer <token>'",
    "malformed": "the authorization metadata must read 'Bearer <token>'",
    "unknown": "the token is not accepted by this server",
}


class SecurityError(Exception):
    """A TLS or token setting cannot work; the message says which and why."""


def _stamp(paths: Sequence[str]) -> tuple | None:
    """What identifies the current content of the files (None when one is missing)."""
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


_NOTHING = object()


class WatchedFiles(Generic[T]):
    """Content parsed from files by `load`, re-read when a file changes.

    `load` raises SecurityError for bad content; at construction that error stops start-up,
    later the last good content stays in use and a warning says why (once per change).
    """

    def __init__(self, paths: Sequence[str], load: Callable[[], T], what: str):
        self.paths = tuple(paths)
        self.what = what
        self._load = load
        self._stamp = _stamp(self.paths)
        self.value = load()
        self._checked = time.monotonic()
        self._failed: object = _NOTHING  # the stamp of files that failed to load (tried once)
        self._lock = threading.Lock()
        self.version = 0

    def refresh(self) -> bool:
        """Re-read the files if they changed since the last look; True when new content is in use.

        `version` counts the reloads, so each user of the content can tell it changed.
        """
        now = time.monotonic()
        if now - self._checked < CHECK_SECONDS or not self._lock.acquire(blocking=False):
            return False
        try:
            self._checked = now
            stamp = _stamp(self.paths)
            if stamp == self._stamp or stamp == self._failed:
                return False
            try:
                if stamp is None:
                    raise SecurityError(f"{', '.join(self.paths)}: a file is missing")
                value = self._load()
            except SecurityError as exc:
                self._failed = stamp
                log.warning(
                    "%s changed but cannot be used, keeping the previous one: %s", self.what, exc
                )
                return False
            self.value, self._stamp, self._failed = value, stamp, _NOTHING
            self.version += 1
            log.info("%s reloaded from %s", self.what, ", ".join(self.paths))
            return True
        finally:
            self._lock.release()


@dataclass(frozen=True)
class KeyPair:
    """A server certificate chain and its key (PEM), plus the CA for client certificates."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def load_key_pair(cert_file: str, key_file: str, client_ca_file: str | None) -> KeyPair:
    """Read and check the server's TLS files (SecurityError with the reason)."""
    try:
        cert = read_pem(cert_file, "TLS certificate file (--tls-cert-file)")
        key = read_pem(key_file, "TLS key file (--tls-key-file)")
        check_key_pair(cert_file, key_file)
        client_ca = None
        if client_ca_file:
            client_ca = read_pem(client_ca_file, "client CA file (--tls-client-ca-file)")
            ssl.create_default_context(cadata=client_ca.decode("ascii", "replace"))
        # A file replaced between the reads and the check: refused now, read again next time.
        if read_pem(cert_file, "certificate") != cert or read_pem(key_file, "key") != key:
            raise ValueError(f"{cert_file} or {key_file} changed while being read")
    except ssl.SSLError as exc:
        raise SecurityError(
            f"the client CA file {client_ca_file} holds no usable CA certificate: {exc.reason or exc}"
        ) from None
    except ValueError as exc:
        raise SecurityError(str(exc)) from None
    return KeyPair(cert, key, client_ca)


class CertificateFiles(WatchedFiles[KeyPair]):
    """The served certificate, key and client CA, picked up anew at TLS handshakes."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None):
        paths = [cert_file, key_file] + ([client_ca_file] if client_ca_file else [])
        super().__init__(
            paths, lambda: load_key_pair(cert_file, key_file, client_ca_file), "TLS certificate"
        )
        self.mutual = client_ca_file is not None
        self._served_version = 0  # the version gRPC serves
        self._context: tuple[int, ssl.SSLContext] | None = None  # /metrics' (version, context)

    def _configuration(self) -> Any:
        pair = self.value
        return grpc.ssl_server_certificate_configuration(
            [(pair.key, pair.cert)], root_certificates=pair.client_ca
        )

    def fetch(self) -> Any:
        """Called by gRPC at every handshake: a new configuration when the files changed, else None."""
        try:
            self.refresh()
            if self.version == self._served_version:
                return None
            self._served_version = self.version
            return self._configuration()
        except Exception:  # noqa: BLE001 - never fail a handshake over a reload; keep serving
            log.exception("TLS certificate reload failed; serving the previous one")
            return None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(), self.fetch, require_client_authentication=self.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side SSLContext of the current files (for /metrics), rebuilt after a change."""
        self.refresh()
        if self._context is None or self._context[0] != self.version:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            # ssl loads a certificate chain only from files: these hold the checked content
            context.load_cert_chain(self.paths[0], self.paths[1])
            if self.value.client_ca is not None:
                context.load_verify_locations(
                    cadata=self.value.client_ca.decode("ascii", "replace")
                )
                context.verify_mode = ssl.CERT_REQUIRED
            self._context = (self.version, context)
        return self._context[1]


def load_tokens(path: str) -> frozenset[bytes]:
    """SHA-256 digests of the tokens in `path`: one per line, blank lines and # comments ignored."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a token
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise SecurityError(f"cannot read the token file {path}: {reason}") from None
    tokens = [line.strip() for line in lines]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise SecurityError(
            f"the token file {path} holds no token (one per line; blank lines and # comments "
            "are ignored)"
        )
    return frozenset(_digest(t) for t in tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def refusal(metadata: Sequence[tuple[str, Any]] | None, known: frozenset[bytes]) -> str | None:
    """Why a call's metadata is refused (a key of REFUSALS), or None when its token is known."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        return "missing"
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "malformed"
    presented = _digest(token.strip())
    # Digests of equal length, every one compared: the time taken says nothing about the tokens.
    matched = False
    for digest in known:
        matched |= hmac.compare_digest(presented, digest)
    return None if matched else "unknown"


class TokenCheck:
    """The handler wrapper that lets a call through when its method is open (OPEN_METHODS) or
    it carries a known token, and answers UNAUTHENTICATED otherwise."""

    def __init__(self, tokens: WatchedFiles[frozenset[bytes]], refused: Callable[[str], None]):
        self.tokens = tokens
        self.refused = refused

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method in OPEN_METHODS:
            return handler
        return run_first(handler, self._check)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        self.tokens.refresh()
        reason = refusal(context.invocation_metadata(), self.tokens.value)
        if reason is not None:
            self.refused(reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSALS[reason])


@dataclass
class Security:
    """The TLS and token setup of one server (both optional)."""

    certificates: CertificateFiles | None = None
    tokens: WatchedFiles[frozenset[bytes]] | None = None
    metrics_tls: bool = False

    @classmethod
    def from_config(cls, config: Any) -> Security:
        """Check the options and read the files; SecurityError says what is wrong."""
        cert, key = config.tls_cert_file, config.tls_key_file
        if bool(cert) != bool(key):
            raise SecurityError(
                "--tls-cert-file and --tls-key-file go together (the certificate and its key)"
            )
        if config.tls_client_ca_file and not cert:
            raise SecurityError(
                "--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file"
            )
        if config.metrics_tls and not cert:
            raise SecurityError("--metrics-tls needs --tls-cert-file and --tls-key-file")
        if config.auth_token_file and not cert and not config.allow_insecure_token:
            raise SecurityError(
                "--auth-token-file without TLS would let tokens cross the network in clear text: "
                "add --tls-cert-file and --tls-key-file, or --allow-insecure-token true when only "
                "a local proxy that terminates TLS can reach this port"
            )
        certificates = CertificateFiles(cert, key, config.tls_client_ca_file) if cert else None
        tokens = None
        if config.auth_token_file:
            path = config.auth_token_file
            tokens = WatchedFiles([path], lambda: load_tokens(path), "token file")
        return cls(certificates, tokens, bool(config.metrics_tls))

    def describe(self) -> str:
        """One line for the start-up log (file names only)."""
        if self.certificates is None:
            transport = "plaintext"
        else:
            transport = "mutual TLS" if self.certificates.mutual else "TLS"
        tokens = f", {len(self.tokens.value)} token(s) required" if self.tokens else ""
        return transport + tokens

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return self.certificates.server_credentials() if self.certificates else None

    def handler_wrappers(self, refused: Callable[[str], None]) -> list[Any]:
        """The token check's handler wrapper (see `wire.WrappingRegistrar`), if tokens are set."""
        return [TokenCheck(self.tokens, refused).wrap] if self.tokens else []

    def metrics_context(self) -> Callable[[], ssl.SSLContext] | None:
        return self.certificates.ssl_context if self.metrics_tls and self.certificates else None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's signature
        pass


def serve_metrics(port: int, host: str, registry: Any, security: Security | None) -> Any:
    """Serve /metrics (plain HTTP, or HTTPS with the gRPC certificate when --metrics-tls is on).

    Returns the server (with `server_port` and `shutdown()`); OSError when it cannot listen.
    """
    from prometheus_client import make_wsgi_app, start_http_server
    from prometheus_client.exposition import ThreadingWSGIServer

    context = security.metrics_context() if security else None
    if context is None:
        server, _ = start_http_server(port, host, registry=registry)
        return server

    class TLSServer(ThreadingWSGIServer):
        """The TLS handshake runs in the request's own thread (a silent client blocks no one),
        with the current certificate (a rotated one is used from the next connection)."""

        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def finish_request(self, request: socket.socket, client_address: Any) -> None:
            request.settimeout(HANDSHAKE_SECONDS)
            try:
                secured = context().wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return  # not TLS, an untrusted client certificate, or too slow: drop it
            super().finish_request(secured, client_address)

    server = make_server(
        host, port, make_wsgi_app(registry), TLSServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics-tls", daemon=True).start()
    return server
