"""lstm-export CHECKPOINT --out models/<name>/<version>: TorchScript + ONNX + manifest (a language model also
its sampler and decode graph), verified and checked for batch invariance."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from lstm_server.runtime.model_repository import ModelRepositoryError
from lstm_training.checkpoint import CheckpointError
from lstm_training.data import DataError

from .exporter import DEFAULT_OPSET
from .pipeline import ExportError, export_checkpoint
from .verify import VerificationError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a best.pt written by lstm-train")
    parser.add_argument("--out", type=Path, required=True, help="models/<name>/<version>: the name is the model's")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {DEFAULT_OPSET} or newer")
    parser.add_argument(
        "--eval-data", type=Path, help="measure quality with onnxruntime: the corpus (language model) or a dev TSV"
    )
    parser.add_argument("--quantize", action="store_true", help="write the per-row int8 graph (ONNX only)")
    parser.add_argument("--force", action="store_true", help="replace an existing entry")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(["lstm-export", *(sys.argv[1:] if argv is None else argv)])
    try:
        manifest = export_checkpoint(
            args.checkpoint, args.out, args.opset, args.eval_data, args.quantize, args.force, command
        )
    except (CheckpointError, ExportError, VerificationError, ModelRepositoryError, DataError, ValueError) as error:
        print(f"lstm-export: {error}", file=sys.stderr)
        return 2
    quality = manifest["quality"]
    print(f"wrote {args.out}: {manifest['task']} model, {quality['metric']} {quality['value']} ({quality['backend']})")
    for check in manifest["export"]["verified"]:
        print(f"  verified: {check}")
    for backend, record in manifest["batch_invariance"].items():
        verdict = "invariant" if record["invariant"] else f"NOT invariant ({record['first_failure']})"
        print(f"  batch invariance, {backend}: {verdict}")
    if "decoding" in manifest:
        for check in manifest["decoding"]["verified"]:
            print(f"  verified: {check}")
        record = manifest["decoding"]["batch_invariance"]["onnxruntime"]
        print(f"  batch invariance, decode.onnx and sample.onnx: {'invariant' if record['invariant'] else 'NOT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
