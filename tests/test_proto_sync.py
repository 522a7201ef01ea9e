"""The committed generated modules match the .proto, and the wire contract matches Triton's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from convserve.proto import generate
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

PROTO_DIR = Path(generate.__file__).resolve().parent


# the grpcio-tools release that generated a module stamps it; a newer release generates the same
# code with its own stamp (the committed stamp is the oldest grpcio the stubs accept)
_STAMP = re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M)


def _unstamped(text: str) -> str:
    return _STAMP.sub("GRPC_GENERATED_VERSION = ...", text)


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {"grpc_service_pb2.py", "grpc_service_pb2_grpc.py"}
    for path in written:
        committed = (PROTO_DIR / path.name).read_text()
        assert _unstamped(path.read_text()) == _unstamped(committed), (
            f"{path.name} is stale: run `python -m convserve.proto.generate` and commit the result"
        )


def test_grpc_module_imports_package_relative() -> None:
    text = (PROTO_DIR / "grpc_service_pb2_grpc.py").read_text()
    assert "from . import grpc_service_pb2 as" in text
    assert "\nimport grpc_service_pb2" not in text
    assert pb_grpc.grpc__service__pb2 is pb


def test_coexists_with_tritonclient_in_one_process() -> None:
    tc = pytest.importorskip("tritonclient.grpc.service_pb2")
    # Both define inference.ModelInferRequest; ours lives in a private pool, so no clash.
    ours = pb.ModelInferRequest(model_name="m", id="7")
    theirs = tc.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.id) == ("m", "7")


def _fields(descriptor) -> dict[str, tuple[int, int, bool]]:
    return {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}


def _walk(descriptor, prefix=""):
    name = prefix + descriptor.name
    yield name, descriptor
    for nested in descriptor.nested_types:
        yield from _walk(nested, name + ".")


def test_field_numbers_match_triton() -> None:
    """Every message/field we share with tritonclient's protos has the same number and type."""
    tc_service = pytest.importorskip("tritonclient.grpc.service_pb2")
    from tritonclient.grpc import model_config_pb2 as tc_config

    theirs = {}
    for module in (tc_service, tc_config):
        for top in module.DESCRIPTOR.message_types_by_name.values():
            theirs.update(dict(_walk(top)))
    compared = 0
    for top in pb.DESCRIPTOR.message_types_by_name.values():
        for name, desc in _walk(top):
            if name not in theirs:
                continue
            other = _fields(theirs[name])
            for field, spec in _fields(desc).items():
                if field in other:
                    assert spec == other[field], (
                        f"{name}.{field}: ours {spec}, Triton {other[field]}"
                    )
                    compared += 1
                else:
                    # only fields newer than the installed tritonclient may be missing there
                    assert (name, field) in {("ModelStatistics", "response_stats")}, (
                        f"{name}.{field} not in Triton"
                    )
    assert compared > 150
    ours_enum = {v.name: v.number for v in pb.DataType.DESCRIPTOR.values}
    assert ours_enum == {v.name: v.number for v in tc_config.DataType.DESCRIPTOR.values}


def test_service_declares_every_triton_rpc() -> None:
    tc_service = pytest.importorskip("tritonclient.grpc.service_pb2")
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = tc_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"

    def sig(service):
        return {
            m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
            for m in service.methods
        }

    assert sig(ours) == sig(theirs)


def test_infer_parameter_has_triton_five_fields() -> None:
    numbers = {f.name: f.number for f in pb.InferParameter.DESCRIPTOR.fields}
    assert numbers == {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    }
