"""TLS, mutual TLS and bearer tokens against real `convserve serve` processes on loopback.

Certificates are made at test time with trustme (a throwaway CA per test module). Clients:
ours (Client, AsyncClient, the CLI), tritonclient, and raw grpc stubs.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import trustme
from convserve.client import AsyncClient, Client, InferenceError
from convserve.client.credentials import is_loopback, token_metadata
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.server.security import SecurityError, load_tokens, refusal
from tritonclient.utils import InferenceServerException

from tests.client_servers import example_files, write_repository
from tests.server_harness import Server, metric
from tests.test_client_cli import convserve as run_convserve

TOKEN = "s3cret-token-one"
# Our clients in these tests use a channel of their own: gRPC may otherwise share one
# connection between channels of the same process, and the tests are about new connections.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
QUICK_START = ("--warmup-batch-sizes", "1", "--drain-seconds", "0", "--grace-period", "5")
WAIT_SECONDS = 30.0  # bound for a rotation to be picked up (the server looks every second)


@dataclass
class Pair:
    cert: Path
    key: Path


def write_pair(ca, folder: Path, name: str, *identities: str) -> Pair:
    """A certificate (chain) and key signed by `ca`, written as PEM files."""
    issued = ca.issue_cert(*identities)
    pair = Pair(folder / f"{name}.crt", folder / f"{name}.key")
    issued.private_key_pem.write_to_path(str(pair.key))
    issued.cert_chain_pems[0].write_to_path(str(pair.cert))
    for blob in issued.cert_chain_pems[1:]:
        blob.write_to_path(str(pair.cert), append=True)
    return pair


@dataclass
class PKI:
    folder: Path
    ca: Path  # the CA the servers' certificates and the good client certificate come from
    other_ca: Path  # an unrelated CA
    server: Pair
    client: Pair
    stranger: Pair  # a client certificate from the other CA
    tokens: Path
    authority: object
    other_authority: object


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    authority, other_authority = trustme.CA(), trustme.CA()
    authority.cert_pem.write_to_path(str(folder / "ca.crt"))
    other_authority.cert_pem.write_to_path(str(folder / "other-ca.crt"))
    tokens = folder / "tokens"
    tokens.write_text(f"# the test's tokens\n\n{TOKEN}\n  second-token  \n")
    return PKI(
        folder,
        folder / "ca.crt",
        folder / "other-ca.crt",
        write_pair(authority, folder, "server", "127.0.0.1", "localhost"),
        write_pair(authority, folder, "client", "client@example.test"),
        write_pair(other_authority, folder, "stranger", "stranger@example.test"),
        tokens,
        authority,
        other_authority,
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return write_repository(tmp_path_factory.mktemp("repo"), {"fashion_mnist": "fashion_mnist"})


class SecureServer(Server):
    """A server whose readiness is asked over TLS (ServerReady needs no token)."""

    def __init__(self, repository: Path, log_dir: Path, *flags: str, **tls: object):
        self.tls = {k: str(v) for k, v in tls.items()}
        super().__init__(repository, *QUICK_START, *flags, log_dir=log_dir)

    def client(self, **overrides: object) -> Client:
        arguments = {**self.tls, "timeout": 10, "options": OWN_CONNECTION, **overrides}
        return Client(self.target, **arguments)

    def wait_ready(self, timeout: float = 240.0) -> SecureServer:
        deadline = time.monotonic() + timeout
        with self.client(token="", retries=0, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.process.returncode}:\n{self.log()}"
                    )
                if client.is_ready():
                    return self
                time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")


def served_by(pair: Pair) -> list[str]:
    return ["--tls-cert-file", str(pair.cert), "--tls-key-file", str(pair.key)]


def start(request, repository: Path, log_dir: Path, *flags: str, **tls: object) -> SecureServer:
    server = SecureServer(repository, log_dir, *flags, **tls)
    request.addfinalizer(server.stop)
    return server.wait_ready()


@pytest.fixture(scope="module")
def tls_server(request, pki, repository, tmp_path_factory) -> SecureServer:
    """TLS, tokens required, /metrics over TLS."""
    flags = [*served_by(pki.server), "--auth-token-file", str(pki.tokens), "--metrics-tls", "true"]
    return start(request, repository, tmp_path_factory.mktemp("logs"), *flags, tls_ca_file=pki.ca)


@pytest.fixture(scope="module")
def mtls_server(request, pki, repository, tmp_path_factory) -> SecureServer:
    """Mutual TLS (on /metrics too), no tokens."""
    flags = [*served_by(pki.server), "--tls-client-ca-file", str(pki.ca), "--metrics-tls", "true"]
    client = {"tls_cert_file": pki.client.cert, "tls_key_file": pki.client.key}
    return start(
        request, repository, tmp_path_factory.mktemp("logs"), *flags, tls_ca_file=pki.ca, **client
    )


def sneaker() -> tuple[Path, int]:
    path, index, _ = next(e for e in example_files() if "sneaker" in e[0].name)
    return path, index


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.uint8).reshape(1, 28, 28, 1)


def triton_infer(client, headers: dict | None = None) -> int:
    """The class tritonclient's inference of the sneaker example gives."""
    path, _ = sneaker()
    x = pixels(path)
    inp = tc.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    result = client.infer("fashion_mnist", [inp], headers=headers, client_timeout=30)
    return int(np.argmax(result.as_numpy("probabilities")[0]))


def convserve(*args: str, token_env: str = "") -> subprocess.CompletedProcess:
    """`convserve ARGS` with $CONVSERVE_TOKEN set to `token_env` ("": no token)."""
    return run_convserve(*args, env={"CONVSERVE_TOKEN": token_env})


# -- TLS with tokens -----------------------------------------------------------------------


def test_client_infers_over_tls_with_token(tls_server):
    path, index = sneaker()
    with tls_server.client(token=TOKEN) as client:
        [[best]] = client.classify([str(path)], top_k=1)
        assert best.index == index
        assert client.models() == ["fashion_mnist"]


def test_async_client_over_tls_with_token_from_environment(tls_server, monkeypatch):
    path, index = sneaker()
    monkeypatch.setenv("CONVSERVE_TOKEN", "second-token")  # the second token of the file

    async def classify():
        async with AsyncClient(
            tls_server.target, tls_ca_file=str(tls_server.tls["tls_ca_file"]), timeout=10
        ) as client:
            return await client.classify([str(path)], top_k=1)

    [[best]] = asyncio.run(classify())
    assert best.index == index


def test_tritonclient_over_tls_with_bearer_header(tls_server, pki):
    client = tc.InferenceServerClient(tls_server.target, ssl=True, root_certificates=str(pki.ca))
    try:
        assert client.is_server_live() and client.is_server_ready()  # open without a token
        assert triton_infer(client, {"authorization": f"Bearer {TOKEN}"}) == sneaker()[1]
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            triton_infer(client)
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.get_model_metadata("fashion_mnist")
    finally:
        client.close()


def test_missing_wrong_and_malformed_tokens_are_refused_and_counted(tls_server, pki):
    before = {
        r: metric(metrics(tls_server, pki), "convserve_auth_refusals_total", reason=r)
        for r in ("missing", "unknown", "malformed")
    }
    with tls_server.client(token="") as client:
        with pytest.raises(InferenceError) as missing:
            client.models()
    assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in missing.value.message
    with tls_server.client(token="not-the-token") as client:
        with pytest.raises(InferenceError) as wrong:
            client.metadata("fashion_mnist")
    assert wrong.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not-the-token" not in wrong.value.message
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with grpc.secure_channel(tls_server.target, credentials, options=OWN_CONNECTION) as channel:
        with pytest.raises(grpc.RpcError) as malformed:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                pb.RepositoryIndexRequest(),
                metadata=(("authorization", f"Basic {TOKEN}"),),
                timeout=10,
            )
    assert malformed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = metrics(tls_server, pki)
    for reason in ("missing", "unknown", "malformed"):
        assert metric(after, "convserve_auth_refusals_total", reason=reason) == before[reason] + 1
    assert TOKEN not in tls_server.log() and "not-the-token" not in tls_server.log()


def test_every_service_but_health_and_liveness_needs_a_token(tls_server, pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with grpc.secure_channel(tls_server.target, credentials, options=OWN_CONNECTION) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        closed = [
            lambda: stub.ModelReady(pb.ModelReadyRequest(name="fashion_mnist"), timeout=10),
            lambda: stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10),
            lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="fashion_mnist"), timeout=10),
            lambda: stub.ModelConfig(pb.ModelConfigRequest(name="fashion_mnist"), timeout=10),
            lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10),
            lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10),
            lambda: stub.ModelInfer(pb.ModelInferRequest(model_name="fashion_mnist"), timeout=10),
            lambda: list(
                reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                )
            ),
        ]
        for call in closed:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", f"bearer {TOKEN}"),)  # the scheme is case-insensitive
        answer = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=10,
            metadata=token,
        )
        services = {s.name for r in answer for s in r.list_services_response.service}
        assert "inference.GRPCInferenceService" in services


def test_plaintext_client_on_tls_port_fails_cleanly(tls_server, pki):
    with Client(
        tls_server.target, token="", retries=0, timeout=5, options=OWN_CONNECTION
    ) as client:
        assert client.is_live() is False
        with pytest.raises(InferenceError) as error:
            client.models()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert "if the server uses TLS, pass tls_ca_file" in error.value.message
    with tls_server.client(token=TOKEN) as client:  # the server keeps serving
        assert client.models() == ["fashion_mnist"]


def test_client_trusting_another_ca_is_refused(tls_server, pki):
    with Client(
        tls_server.target,
        tls_ca_file=str(pki.other_ca),
        token=TOKEN,
        retries=0,
        timeout=5,
        options=OWN_CONNECTION,
    ) as client:
        with pytest.raises(InferenceError) as error:
            client.models()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in error.value.message


def metrics(server: SecureServer, pki: PKI, client: Pair | None = None) -> str:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    url = f"https://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return response.read().decode()


def test_metrics_over_tls(tls_server, pki):
    assert "convserve_server_ready 1.0" in metrics(tls_server, pki)
    with pytest.raises(OSError):  # plain HTTP gets no answer from the TLS port
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.metrics_port}/metrics", timeout=10)


def test_cli_over_tls(tls_server, pki):
    path, index = sneaker()
    ca = ("--target", tls_server.target, "--tls-ca-file", str(pki.ca))
    done = convserve("classify", str(path), *ca, "--token", TOKEN)
    assert done.returncode == 0, done.stderr
    assert "Sneaker" in done.stdout
    done = convserve("models", *ca, token_env=TOKEN)
    assert done.returncode == 0, done.stderr
    assert "fashion_mnist" in done.stdout
    done = convserve("models", *ca)
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
    assert done.stderr.count("\n") == 1  # one line, no gRPC log lines, no traceback
    done = convserve("health", *ca)  # no token needed
    assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr
    done = convserve("health", "--target", tls_server.target, "--timeout", "3")  # plaintext
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "pass --tls-ca-file" in done.stderr


# -- mutual TLS ----------------------------------------------------------------------------


def test_mtls_client_with_certificate_infers(mtls_server, pki):
    path, index = sneaker()
    with mtls_server.client() as client:
        [[best]] = client.classify([str(path)], top_k=1)
    assert best.index == index
    triton = tc.InferenceServerClient(
        mtls_server.target,
        ssl=True,
        root_certificates=str(pki.ca),
        private_key=str(pki.client.key),
        certificate_chain=str(pki.client.cert),
    )
    try:
        assert triton_infer(triton) == index
    finally:
        triton.close()
    done = convserve(
        "classify",
        str(path),
        "--target",
        mtls_server.target,
        "--tls-ca-file",
        str(pki.ca),
        "--tls-cert-file",
        str(pki.client.cert),
        "--tls-key-file",
        str(pki.client.key),
    )
    assert done.returncode == 0 and "Sneaker" in done.stdout, done.stderr


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_mtls_refuses_clients_without_a_trusted_certificate(mtls_server, pki, who):
    pair = {"tls_cert_file": None, "tls_key_file": None}
    if who != "no certificate":
        pair = {"tls_cert_file": str(pki.stranger.cert), "tls_key_file": str(pki.stranger.key)}
    with mtls_server.client(retries=0, timeout=5, **pair) as client:
        assert client.is_live() is False  # refused at the handshake, before any call
        with pytest.raises(InferenceError) as error:
            client.models()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    with mtls_server.client() as client:
        assert client.is_live()


def test_metrics_under_mtls_need_a_client_certificate(mtls_server, pki):
    assert "convserve_server_ready 1.0" in metrics(mtls_server, pki, pki.client)
    for stranger in (None, pki.stranger):
        with pytest.raises(OSError):
            metrics(mtls_server, pki, stranger)


# -- rotation ------------------------------------------------------------------------------


def replace(path: Path, data: bytes) -> None:
    """Replace a file at once (as Kubernetes and cert-manager do), never half-written."""
    temporary = path.with_suffix(".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def eventually(check, what: str, server: SecureServer):
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            return check()
        except (InferenceError, AssertionError):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what} not seen in {WAIT_SECONDS} s:\n{server.log()}"
                ) from None
            time.sleep(0.3)


def test_certificate_and_token_rotation_without_restart(request, pki, repository, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    pair = Pair(live / "tls.crt", live / "tls.key")
    tokens = live / "tokens"
    pair.cert.write_bytes(pki.server.cert.read_bytes())
    pair.key.write_bytes(pki.server.key.read_bytes())
    tokens.write_text("old-token\n")
    flags = [*served_by(pair), "--auth-token-file", str(tokens)]
    server = start(request, repository, tmp_path, *flags, tls_ca_file=pki.ca)
    pid = server.process.pid
    with server.client(token="old-token") as old_connection:
        assert old_connection.models() == ["fashion_mnist"]

        # a certificate from another CA, written over the served files
        fresh = write_pair(pki.other_authority, tmp_path, "fresh", "127.0.0.1")
        replace(pair.key, fresh.key.read_bytes())
        replace(pair.cert, fresh.cert.read_bytes())

        def served_by_new_ca():
            with server.client(
                tls_ca_file=str(pki.other_ca), token="old-token", retries=0
            ) as client:
                return client.models()

        assert eventually(served_by_new_ca, "the new certificate", server) == ["fashion_mnist"]
        # a new connection that trusts only the old CA is refused now
        with server.client(token="old-token", retries=0, timeout=5) as stale:
            with pytest.raises(InferenceError, match="CERTIFICATE_VERIFY_FAILED"):
                stale.models()

        # a new token file: the old token is refused, the new one accepted
        replace(tokens, b"# rotated\nnew-token\n")

        def old_token_refused():
            try:
                old_connection.models()
            except InferenceError as error:
                assert error.code == grpc.StatusCode.UNAUTHENTICATED
                return
            raise AssertionError("the old token is still accepted")

        eventually(old_token_refused, "the token rotation", server)
    with server.client(tls_ca_file=str(pki.other_ca), token="new-token") as client:
        assert client.models() == ["fashion_mnist"]

    # a broken replacement (empty token file, mismatched key) keeps the last good files in use
    replace(tokens, b"\n# nothing\n")
    replace(pair.key, pki.server.key.read_bytes())
    time.sleep(2.5)  # the server looks every second
    with server.client(tls_ca_file=str(pki.other_ca), token="new-token") as client:
        assert client.models() == ["fashion_mnist"]
    log = server.log()
    assert "TLS certificate reloaded" in log and "token file reloaded" in log
    assert "keeping the previous one" in log
    assert server.process.poll() is None and server.process.pid == pid  # never restarted
    assert "old-token" not in log and "new-token" not in log


def test_workers_share_tls_tokens_and_metrics(request, pki, repository, tmp_path):
    flags = ["--workers", "2", *served_by(pki.server), "--auth-token-file", str(pki.tokens)]
    server = start(
        request, repository, tmp_path, *flags, "--metrics-tls", "true", tls_ca_file=pki.ca
    )
    for _ in range(6):  # new connections, spread over both workers by the kernel
        with server.client(token=TOKEN, timeout=60) as client:
            client.wait_until_ready()
            assert client.models() == ["fashion_mnist"]
        with server.client(token="") as client:
            with pytest.raises(InferenceError, match="UNAUTHENTICATED"):
                client.models()
    # the supervisor serves the workers' summed metrics over TLS
    assert metric(metrics(server, pki), "convserve_auth_refusals_total", reason="missing") == 6


# -- plaintext token for a loopback sidecar ------------------------------------------------


def test_insecure_token_allowed_for_loopback(request, pki, repository, tmp_path):
    server = start(
        request,
        repository,
        tmp_path,
        "--auth-token-file",
        str(pki.tokens),
        "--allow-insecure-token",
        "true",
    )
    with server.client(token=TOKEN) as client:
        assert client.models() == ["fashion_mnist"]
    with server.client(token="") as client:
        assert client.is_ready()  # open
        with pytest.raises(InferenceError, match="UNAUTHENTICATED"):
            client.models()


# -- start-up misconfiguration -------------------------------------------------------------


def misconfigurations(pki: PKI, folder: Path) -> dict[str, tuple[list[str], str]]:
    """name: (flags, what the one error line must say)."""
    empty = folder / "empty-tokens"
    empty.write_text("# no tokens yet\n\n")
    garbage = folder / "garbage.pem"
    garbage.write_text("not a certificate\n")
    unreadable = folder / "a-folder.key"  # a folder cannot be read as a file, even by root
    unreadable.mkdir()
    bad_ca = folder / "bad-ca.pem"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    cert = ["--tls-cert-file", str(pki.server.cert)]
    key = ["--tls-key-file", str(pki.server.key)]
    return {
        "cert without key": (cert, "--tls-cert-file and --tls-key-file go together"),
        "key without cert": (key, "--tls-cert-file and --tls-key-file go together"),
        "missing cert": (
            ["--tls-cert-file", str(folder / "nope.crt"), *key],
            "cannot read the TLS certificate file",
        ),
        "unreadable key": (
            [*cert, "--tls-key-file", str(unreadable)],
            "cannot read the TLS key file",
        ),
        "not PEM": (["--tls-cert-file", str(garbage), *key], "holds no PEM block"),
        "key of another certificate": (
            [*cert, "--tls-key-file", str(pki.client.key)],
            "does not belong to the certificate",
        ),
        "client CA without TLS": (["--tls-client-ca-file", str(pki.ca)], "mutual TLS) needs"),
        "bad client CA": (
            [*cert, *key, "--tls-client-ca-file", str(bad_ca)],
            "no usable CA certificate",
        ),
        "empty token file": ([*cert, *key, "--auth-token-file", str(empty)], "holds no token"),
        "missing token file": (
            [*cert, *key, "--auth-token-file", str(folder / "nope")],
            "cannot read the token file",
        ),
        "token without TLS": (["--auth-token-file", str(pki.tokens)], "--allow-insecure-token"),
        "metrics TLS without TLS": (["--metrics-tls", "true"], "--metrics-tls needs"),
    }


def test_every_misconfiguration_fails_start_up_with_one_line(pki, repository, tmp_path):
    for name, (flags, message) in misconfigurations(pki, tmp_path).items():
        done = convserve(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--model-repository",
            str(repository),
            *flags,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (name, done.stderr)
        assert len(lines) == 1 and "cannot start:" in lines[0] and message in lines[0], (
            name,
            lines,
        )


# -- the pieces, directly ------------------------------------------------------------------


def test_token_file_parsing_and_refusal_reasons(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("\ufeff# comment\r\n\r\n  alpha  \r\nbeta\n#gamma\n", encoding="utf-8")
    known = load_tokens(str(path))
    assert len(known) == 2
    assert refusal((("authorization", "Bearer alpha"),), known) is None
    assert refusal((("authorization", "bearer beta"),), known) is None
    assert refusal((("authorization", "Bearer gamma"),), known) == "unknown"
    assert refusal((("authorization", "Bearer #gamma"),), known) == "unknown"
    assert refusal((("authorization", "alpha"),), known) == "malformed"
    assert refusal((("authorization", "Bearer "),), known) == "malformed"
    assert refusal((("x-other", "Bearer alpha"),), known) == "missing"
    assert refusal(None, known) == "missing"
    path.write_text("# only comments\n")
    with pytest.raises(SecurityError, match="holds no token"):
        load_tokens(str(path))


def test_client_token_and_tls_arguments(pki, monkeypatch):
    assert (
        is_loopback("127.0.0.1:8001")
        and is_loopback("localhost:8001")
        and is_loopback("[::1]:8001")
    )
    assert is_loopback("ipv4:127.0.0.1:1,127.0.0.2:2") and is_loopback("unix:/tmp/socket")
    assert not is_loopback("10.0.0.1:8001") and not is_loopback("dns:///convserve:8001")
    assert token_metadata("abc", True, "convserve:8001") == (("authorization", "Bearer abc"),)
    assert token_metadata("", True, "convserve:8001") == ()
    monkeypatch.setenv("CONVSERVE_TOKEN", "from-env")
    assert token_metadata(None, False, "127.0.0.1:1") == (("authorization", "Bearer from-env"),)
    with pytest.raises(ValueError, match="clear text"):
        Client("10.1.2.3:8001")  # the environment's token, no TLS, another host
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        Client("127.0.0.1:1", tls_cert_file=str(pki.client.cert))
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1:1", tls_ca_file=str(pki.ca), credentials=grpc.ssl_channel_credentials())
    with pytest.raises(ValueError, match="does not belong"):
        Client("127.0.0.1:1", tls_cert_file=str(pki.client.cert), tls_key_file=str(pki.server.key))
    with pytest.raises(ValueError, match="cannot read the CA certificate file"):
        Client("127.0.0.1:1", tls_ca_file=str(pki.folder / "missing.crt"))
    client = Client("127.0.0.1:1", tls_ca_file=str(pki.ca), token="hidden-value")
    assert "hidden-value" not in repr(client)
    client.close()


def test_credentials_argument_still_works(tls_server, pki):
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with Client(tls_server.target, credentials=credentials, token=TOKEN, timeout=10) as client:
        assert client.models() == ["fashion_mnist"]
