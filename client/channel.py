"""Turning the `target` argument into a gRPC target string and channel options.

One `host:port` gives an ordinary channel. Several targets (a list, or one string with commas)
or a `dns:///name:port` target use gRPC's `round_robin` load-balancing policy, so requests are
spread over every address rather than pinned to the first one (gRPC's default, `pick_first`).
Several host names are resolved once, here, into one `ipv4:` (or `ipv6:`) target, the form
gRPC accepts for a fixed list of addresses; use `dns:///` for a name that should be re-resolved.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence

DEFAULT_TARGET = "localhost:8001"
TARGET_ENV = "CONVSERVE_TARGET"
INT32_MAX = 2**31 - 1

BASE_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
    # Reconnect soon after a server (re)starts, so retries of UNAVAILABLE can succeed: gRPC's
    # default first reconnect backoff is 1 s, growing to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def default_target() -> str:
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def _split(target: str | Sequence[str] | None) -> list[str]:
    if target is None:
        target = default_target()
    items = [target] if isinstance(target, str) else list(target)
    parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"target must name at least one host:port, got {target!r}")
    return parts


def _host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"each of several targets must be host:port, got {target!r}")
    return host.strip("[]"), int(port)


def _addresses(host: str, port: int) -> tuple[list[str], list[str]]:
    """IPv4 and IPv6 addresses of host (a literal or a name)."""
    try:
        ip = ipaddress.ip_address(host)
        return ([str(ip)], []) if ip.version == 4 else ([], [str(ip)])
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve target host {host!r}: {exc}") from None
    v4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
    v6 = [info[4][0] for info in infos if info[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4)), list(dict.fromkeys(v6))


def resolve(target: str | Sequence[str] | None) -> tuple[str, bool]:
    """(gRPC target string, use round_robin) for the `target` argument of the clients."""
    parts = _split(target)
    if len(parts) == 1:
        return parts[0], parts[0].startswith("dns:")
    hosts = [_host_port(p) for p in parts]
    resolved = [(_addresses(host, port), port) for host, port in hosts]
    if all(v4 for (v4, _), _ in resolved):
        addresses = [f"{a}:{port}" for (v4, _), port in resolved for a in v4]
        return "ipv4:" + ",".join(dict.fromkeys(addresses)), True
    if all(v6 for (_, v6), _ in resolved):
        addresses = [f"[{a}]:{port}" for (_, v6), port in resolved for a in v6]
        return "ipv6:" + ",".join(dict.fromkeys(addresses)), True
    raise ValueError(
        f"targets {parts} mix IPv4-only and IPv6-only hosts; gRPC needs one address family"
    )


def options(
    round_robin: bool, extra: Sequence[tuple[str, int | str]] = ()
) -> list[tuple[str, int | str]]:
    opts = dict(BASE_OPTIONS)
    if round_robin:
        opts["grpc.lb_policy_name"] = "round_robin"
        # gRPC re-resolves a dns:/// name only when a connection ends (a server's GOAWAY at its
        # max connection age, a replica gone), and by default at most every 30 s: a replica added
        # behind the name would then wait up to 30 s for traffic after the GOAWAY that should
        # bring it. One look-up a second per channel at most is cheap for any cluster DNS.
        opts["grpc.dns_min_time_between_resolutions_ms"] = 1000
    opts.update(dict(extra))
    return list(opts.items())
