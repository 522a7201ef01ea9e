"""gRPC channel arguments for a server behind a load balancer: connection age and keepalive.

gRPC clients keep one HTTP/2 connection for hours, so replicas added later (a scale-up, a
rolling update) would get no traffic from clients already connected. A maximum connection age
makes the server send GOAWAY now and then: the client finishes its running calls on the old
connection, re-resolves the name and spreads new calls over every address it finds.
Keepalive pings drop connections whose peer vanished without closing them (a node lost, a NAT
entry expired), and the ping policy says how often clients may ping us.
"""

from __future__ import annotations

import math

from convserve.server.config import ServerConfig


def _ms(seconds: float) -> int:
    return min(int(round(seconds * 1000)), 2**31 - 1)


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """grpc server options for the connection age and keepalive settings of `config`."""
    options: list[tuple[str, int]] = []
    if config.max_connection_age_secs > 0:
        options.append(("grpc.max_connection_age_ms", _ms(config.max_connection_age_secs)))
        if math.isfinite(config.max_connection_age_grace_secs):
            grace = _ms(config.max_connection_age_grace_secs)
            options.append(("grpc.max_connection_age_grace_ms", grace))
    if config.keepalive_time_secs > 0:
        timeout = _ms(config.keepalive_timeout_secs)
        options += [
            ("grpc.keepalive_time_ms", _ms(config.keepalive_time_secs)),
            ("grpc.keepalive_timeout_ms", timeout),
            # gRPC core waits for a ping's ack this long (1 minute by default once keepalive is
            # on), whatever keepalive_timeout says: measured here, a silent peer was dropped
            # only after keepalive time + 60 s without it.
            ("grpc.http2.ping_timeout_ms", timeout),
        ]
    interval = _ms(config.keepalive_min_client_interval_secs)
    options += [
        # Clients that ping between calls (keepalive_permit_without_calls) are allowed, as long
        # as they ping no more often than the interval; gRPC's defaults refuse any ping without
        # a call and allow one per 5 minutes, which makes well-meant client keepalive fail.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", interval),
    ]
    return options
