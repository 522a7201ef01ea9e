"""Regenerate the Python modules for grpc_service.proto.

    python -m convserve.proto.generate            # writes next to this file
    python -m convserve.proto.generate --out DIR  # writes into DIR (used by tests/test_proto_sync.py)

Needs grpcio-tools (a test/dev dependency). Three edits are applied to protoc's output:

* the generated `_pb2_grpc` module imports its `_pb2` sibling package-relatively, so the
  modules work as `convserve.proto.*`;
* the message classes are built with the importing module's name (`__name__`, e.g.
  `convserve.proto.grpc_service_pb2`) instead of protoc's bare `grpc_service_pb2`, so pickle can
  find them again: Ray Serve pickles requests and responses between its processes;
* the messages are registered in a private descriptor pool (`DESCRIPTOR_POOL`) instead of
  protobuf's process-wide default pool, because `tritonclient.grpc` registers the same
  `inference.*` names there: with the default pool, importing both in one process fails with
  "duplicate symbol 'inference.ServerLiveRequest'".
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ["grpc_service.proto"]


def _patch_pb2(text: str) -> str:
    pool_line = "DESCRIPTOR_POOL = _descriptor_pool.DescriptorPool()  # private: see generate.py\n"
    text, n = re.subn(
        r"^(_sym_db = _symbol_database\.Default\(\)\n)",
        r"\1" + pool_line,
        text,
        count=1,
        flags=re.M,
    )
    if n != 1:
        raise RuntimeError("unexpected protoc output: no _sym_db line")
    edits = (
        (
            r"_descriptor_pool\.Default\(\)\.AddSerializedFile",
            "DESCRIPTOR_POOL.AddSerializedFile",
            "AddSerializedFile call",
        ),
        (
            r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '[\w.]+', _globals\)",
            "BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, _globals)",
            "BuildTopDescriptorsAndMessages call",
        ),
    )
    for pattern, replacement, what in edits:
        text, n = re.subn(pattern, replacement, text)
        if n != 1:
            raise RuntimeError(f"unexpected protoc output: no {what}")
    return text


def _patch_pb2_grpc(text: str, stem: str) -> str:
    text, n = re.subn(rf"^import {stem}_pb2 as ", f"from . import {stem}_pb2 as ", text, flags=re.M)
    if n != 1:
        raise RuntimeError(f"unexpected protoc output: no 'import {stem}_pb2' line")
    return text


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on PROTOS and write the patched modules into out_dir; return their paths."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency, imported only here

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for proto in PROTOS:
            rc = protoc.main(
                [
                    "grpc_tools.protoc",
                    f"-I{HERE}",
                    f"-I{include}",
                    f"--python_out={tmp}",
                    f"--grpc_python_out={tmp}",
                    str(HERE / proto),
                ]
            )
            if rc != 0:
                raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
            stem = proto.removesuffix(".proto")
            pb2 = Path(tmp, f"{stem}_pb2.py")
            pb2_grpc = Path(tmp, f"{stem}_pb2_grpc.py")
            targets = {
                out_dir / pb2.name: _patch_pb2(pb2.read_text()),
                out_dir / pb2_grpc.name: _patch_pb2_grpc(pb2_grpc.read_text(), stem),
            }
            for path, text in targets.items():
                path.write_text(text)
                written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=HERE, help="output directory (default: next to the .proto)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
