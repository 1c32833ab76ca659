"""The committed gRPC stubs are exactly what grpc_tools.protoc makes from proto/ (run `make proto` after editing)."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_the_proto_files(tmp_path) -> None:
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        str(ROOT / "proto" / "lstm" / "v1" / "lstm.proto"),
    ]
    assert protoc.main(args) == 0
    for name in ("lstm_pb2.py", "lstm_pb2_grpc.py", "lstm_pb2.pyi"):
        committed = (ROOT / "client" / "src" / "lstm" / "v1" / name).read_text()
        assert (tmp_path / "lstm" / "v1" / name).read_text() == committed, f"{name} is stale: run `make proto`"
