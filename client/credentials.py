"""TLS files and bearer tokens for the client side of a connection.

`channel_credentials()` turns the `tls_*` arguments into gRPC channel credentials (TLS is on as
soon as one is given), `token_metadata()` turns a token into the `authorization: Bearer ...`
metadata sent with every call. `read_pem()` and `check_key_pair()` are shared with the server,
which reads its own certificate the same way.
"""

from __future__ import annotations

import ipaddress
import os
import ssl

import grpc

TOKEN_ENV = "CONVSERVE_TOKEN"
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def read_pem(path: str, what: str) -> bytes:
    """The bytes of a PEM file; ValueError naming `what` and the reason when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} {path} holds no PEM block (-----BEGIN ...)")
    return data


def check_key_pair(cert_path: str, key_path: str) -> None:
    """ValueError unless `key_path` holds the unencrypted private key of the certificate in `cert_path`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # An encrypted key would make OpenSSL prompt on the terminal; the empty password fails instead.
        context.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ValueError(
                f"the private key {key_path} does not belong to the certificate {cert_path}"
            ) from None
        raise ValueError(
            f"cannot load the certificate {cert_path} with the key {key_path} (a PEM certificate "
            f"and its unencrypted PEM private key are needed): {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {cert_path} or {key_path}: {exc.strerror or exc}") from None


def channel_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files, or None (plaintext) when no file is given.

    `ca_file` is the CA that signed the server's certificate (None: the system's trusted CAs);
    `cert_file` and `key_file` are the client's own certificate and key for mutual TLS.
    """
    if not (ca_file or cert_file or key_file):
        return None
    if bool(cert_file) != bool(key_file):
        raise ValueError(
            "a client certificate needs its key and the other way round: pass both "
            "tls_cert_file and tls_key_file (or neither)"
        )
    root = read_pem(ca_file, "CA certificate file") if ca_file else None
    cert = key = None
    if cert_file and key_file:
        cert = read_pem(cert_file, "client certificate file")
        key = read_pem(key_file, "client key file")
        check_key_pair(cert_file, key_file)
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names only this machine (loopback addresses, localhost, unix sockets)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    for address in target.split(","):
        host = address.rpartition(":")[0] if address.count(":") == 1 or "]" in address else address
        host = host.strip("[]").lower()
        if host in LOOPBACK_NAMES:
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def token_metadata(token: str | None, secure: bool, target: str) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying `token` (default $CONVSERVE_TOKEN; "" sends none).

    A token is a password: it is sent in clear text only to this machine (a local proxy that
    adds TLS, for example); to another host it needs a TLS channel.
    """
    token = (os.environ.get(TOKEN_ENV, "") if token is None else token).strip()
    if not token:
        return ()
    if not secure and not is_loopback(target):
        raise ValueError(
            f"a token would travel in clear text to {target}: use TLS (tls_ca_file=... or "
            f"credentials=...), or pass token='' to send none (the token may come from ${TOKEN_ENV})"
        )
    return (("authorization", f"Bearer {token}"),)
