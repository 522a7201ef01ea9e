"""A tiny DNS server on 127.0.0.1 standing in for a headless Service's name (not a test module).

It answers A queries for one name with the addresses it currently holds (changeable while it
runs, as a Service's endpoints change) and nothing else. gRPC's default resolver (c-ares)
honours a DNS server named in the target's authority, so a client dials
`dns://127.0.0.1:<port>/<name>:<grpc port>` and resolves through this server alone: no
/etc/hosts edit, no system resolver involved.
"""

from __future__ import annotations

import socket
import threading

from dnslib import QTYPE, RCODE, RR, A, DNSRecord


class DnsStandIn:
    """`with DnsStandIn("convserve.test", ["127.0.0.1"]) as dns: dns.target(8001)`."""

    def __init__(self, name: str, addresses: list[str], ttl: int = 1):
        self.name = name.rstrip(".") + "."
        self.ttl = ttl
        self._addresses = list(addresses)
        self._lock = threading.Lock()
        self.queries = 0  # A queries answered for the name (each resolution makes one)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-stand-in", daemon=True)
        self._thread.start()

    def target(self, grpc_port: int) -> str:
        return f"dns://127.0.0.1:{self.port}/{self.name.rstrip('.')}:{grpc_port}"

    def set_addresses(self, addresses: list[str]) -> None:
        with self._lock:
            self._addresses = list(addresses)

    def _answer(self, data: bytes) -> bytes | None:
        try:
            query = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - not DNS: ignore it
            return None
        reply = query.reply()
        if str(query.q.qname).lower() != self.name.lower():
            reply.header.rcode = RCODE.NXDOMAIN
        elif query.q.qtype == QTYPE.A:
            with self._lock:
                addresses = list(self._addresses)
                self.queries += 1
            for address in addresses:
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(address), ttl=self.ttl))
        return reply.pack()  # other types (AAAA): no records, no error

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self._answer(data)
            if answer is not None:
                self._socket.sendto(answer, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def __enter__(self) -> DnsStandIn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
