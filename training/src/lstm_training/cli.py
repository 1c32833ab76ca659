"""lstm-train charlm ..., lstm-train sentiment ... and lstm-train compact ...; run under torchrun for data
parallelism."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields

import torch

from .checkpoint import CheckpointError, compact_checkpoint, load_checkpoint
from .data import CharVocab, DataError, read_sst2, resolve_corpus, sha256_file, split_text
from .models import CharLMConfig, ClassifierConfig
from .tasks import ClassificationTask, DistillationTask, LanguageModelTask
from .tokenizer import load_tokenizer, train_tokenizer
from .trainer import TrainConfig, Trainer, TrainingDiverged, init_distributed
from .transfer import AugmentConfig, TransferError, build_transfer, check_shapes, load_transfer

SENTIMENT_LABELS = ["negative", "positive"]

OPTION_HELP = {  # the dataclass fields' --options (CharLMConfig, ClassifierConfig, TrainConfig)
    "embedding_dim": "size of each token's embedding",
    "hidden_size": "LSTM hidden units per layer and direction",
    "num_layers": "stacked LSTM layers",
    "dropout": "dropout probability between layers and before the output",
    "bidirectional": "read the text in both directions",
    "epochs": "the most epochs to train",
    "lr": "peak AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "steps of linear learning-rate warmup",
    "lr_decay": "learning-rate factor per epoch, applied step by step",
    "clip": "clip the gradient norm to this",
    "patience": "stop after this many epochs without a better validation metric",
    "seed": "random seed of the initial weights, the batches and dropout",
    "log_every": "log the training loss every this many steps",
    "max_steps_per_epoch": "cap the steps of an epoch (default: none, the whole training set)",
    "explode_threshold": "log an exploding-gradient event above this gradient norm",
    "vanish_threshold": "log a vanishing-gradient event below this gradient norm",
    "average_from": "from this epoch on, also try the average of the epochs' weights; 0: off",
}


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per dataclass field, defaulting to the field's default, with its OPTION_HELP."""
    for field in fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        text = OPTION_HELP[field.name]
        help_text = text if "(default" in text else f"{text} (default: %(default)s)"
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        elif field.type in ("int | None",):
            parser.add_argument(flag, type=int, default=field.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[field.type]
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)


def _pick(args: argparse.Namespace, cls, **overrides):
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-train", description=__doc__)
    commands = parser.add_subparsers(dest="model", required=True)

    charlm = commands.add_parser("charlm", help="character language model on a text corpus")
    charlm.add_argument(
        "--data", default="tinyshakespeare", help="a text file, or a corpus name to download (default: %(default)s)"
    )
    charlm.add_argument(
        "--batch-size", type=int, default=64, help="streams per step, per process under torchrun (default: %(default)s)"
    )
    charlm.add_argument(
        "--seq-len",
        type=int,
        default=128,
        help="characters per window, the truncated BPTT length (default: %(default)s)",
    )
    _add_dataclass_options(charlm, CharLMConfig, skip=("vocab_size",))

    sentiment = commands.add_parser("sentiment", help="sentiment classifier on SST-2 TSV files")
    sentiment.add_argument("--train", required=True, help="SST-2 training TSV")
    sentiment.add_argument("--dev", required=True, help="SST-2 dev TSV")
    sentiment.add_argument(
        "--batch-size", type=int, default=64, help="texts per step, per process under torchrun (default: %(default)s)"
    )
    sentiment.add_argument(
        "--tokenizer-vocab-size", type=int, default=16000, help="tokens the BPE tokenizer learns (default: %(default)s)"
    )
    _add_dataclass_options(sentiment, ClassifierConfig, skip=("vocab_size", "num_labels", "pad_id"))
    sentiment.add_argument(
        "--transfer", help="learn from a teacher: the file 'lstm-train transfer' wrote (default: true labels only)"
    )
    sentiment.add_argument(
        "--label-weight",
        type=float,
        default=0.5,
        help="with --transfer: weight of the true labels' cross-entropy beside the logits' squared error "
        "(default: %(default)s)",
    )
    sentiment.add_argument(
        "--teacher-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --transfer: start the embeddings from the teacher's (default: %(default)s)",
    )

    transfer = commands.add_parser(
        "transfer", help="the teacher's logits on SST-2 train and augmented sentences, for students (extra: teacher)"
    )
    transfer.add_argument("--teacher", required=True, help="the teacher's best.pt ('lstm-train teacher')")
    transfer.add_argument("--train", required=True, help="SST-2 training TSV")
    transfer.add_argument("--out", required=True, help="the transfer file to write (required)")
    transfer.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    for field in fields(AugmentConfig):
        flag = "--augment" if field.name == "count" else "--" + field.name.replace("_", "-")
        transfer.add_argument(
            flag,
            type=type(field.default),
            default=field.default,
            help=f"{AUGMENT_HELP[field.name]} (default: %(default)s)",
            dest=field.name,
        )

    teacher = commands.add_parser("teacher", help="fine-tune the pretrained English encoder on SST-2 (extra: teacher)")
    teacher.add_argument("--train", required=True, help="SST-2 training TSV")
    teacher.add_argument("--dev", required=True, help="SST-2 dev TSV (validation only)")
    teacher.add_argument("--out", required=True, help="directory for best.pt and metrics.jsonl (required)")
    teacher.add_argument(
        "--max-len", type=int, default=64, help="WordPiece tokens kept per text (default: %(default)s)"
    )
    teacher.add_argument(
        "--epochs", type=float, default=1.0, help="passes over the training set (default: %(default)s)"
    )
    teacher.add_argument("--batch-size", type=int, default=32, help="texts per step (default: %(default)s)")
    teacher.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate (default: %(default)s)")
    teacher.add_argument(
        "--eval-every", type=int, default=500, help="validate every this many steps (default: %(default)s)"
    )
    teacher.add_argument(
        "--max-train",
        type=int,
        default=0,
        help="use a random sample of this many training texts; 0: all (default: %(default)s)",
    )
    teacher.add_argument(
        "--seed", type=int, default=1337, help="random seed of the head, the batches and dropout (default: %(default)s)"
    )
    teacher.add_argument(
        "--freeze-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the encoder's word-piece embeddings as pretrained (default: %(default)s)",
    )
    teacher.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    summary = commands.add_parser(
        "summary", help="best dev accuracy of several runs (seeds): each, mean and spread; keep the best"
    )
    summary.add_argument("checkpoints", nargs="+", help="the runs' best.pt")
    summary.add_argument("--compact-best", help="write the run with the best dev accuracy here, compacted (float16)")

    compact = commands.add_parser("compact", help="store a checkpoint's weights as float16 (half the size)")
    compact.add_argument("checkpoint", help="a best.pt")
    compact.add_argument("--out", required=True, help="where to write the compact checkpoint")

    for sub in (charlm, sentiment):
        sub.add_argument(
            "--out", required=True, help="directory for best.pt, last.pt, metrics.jsonl, curves.png (required)"
        )
        sub.add_argument("--resume", help="continue from this last.pt (default: start afresh)")
        sub.add_argument(
            "--device",
            default="cuda" if torch.cuda.is_available() else "cpu",
            choices=["cpu", "cuda"],
            help="where to train (default: cuda when available, else cpu; here %(default)s)",
        )
        sub.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
        _add_dataclass_options(sub, TrainConfig)
    return parser


AUGMENT_HELP = {
    "count": "augmented sentences to make from the training texts",
    "p_mask": "probability that a word becomes [MASK]",
    "p_substitute": "probability that a word becomes another training word",
    "p_ngram": "probability that only an n-gram of the sentence is kept",
    "max_ngram": "the longest n-gram kept",
    "seed": "random seed of the augmentation",
}


def make_task(args: argparse.Namespace, rank: int, world_size: int):
    """The task and the sha256 of its training data."""
    if args.model == "charlm":
        path = resolve_corpus(args.data)
        text = path.read_text(encoding="utf-8")
        train_text, _ = split_text(text)
        vocab = CharVocab.from_text(text)
        config = _pick(args, CharLMConfig, vocab_size=len(vocab))
        ids = torch.tensor(vocab.encode(text), dtype=torch.long)
        train_ids, val_ids = ids[: len(train_text)], ids[len(train_text) :]
        task = LanguageModelTask(train_ids, val_ids, vocab, config, args.batch_size, args.seq_len, rank, world_size)
        return task, sha256_file(path)
    train, dev = read_sst2(args.train), read_sst2(args.dev)
    if args.transfer:
        transfer = load_transfer(args.transfer)
        check_shapes(transfer)
        tokenizer = load_tokenizer(transfer["tokenizer"])
        config = _pick(args, ClassifierConfig, vocab_size=tokenizer.get_vocab_size(), num_labels=len(SENTIMENT_LABELS))
        task = DistillationTask(
            transfer,
            dev,
            tokenizer,
            SENTIMENT_LABELS,
            config,
            args.batch_size,
            args.label_weight,
            args.teacher_embeddings and not args.resume,
            rank,
            world_size,
        )
        return task, sha256_file(args.train)
    if args.resume:  # the weights belong to the checkpoint's token ids
        tokenizer = load_tokenizer(load_checkpoint(args.resume, expected_kind="sentiment")["tokenizer"])
    else:
        tokenizer = train_tokenizer((text for text, _ in train), vocab_size=args.tokenizer_vocab_size)
    config = _pick(args, ClassifierConfig, vocab_size=tokenizer.get_vocab_size(), num_labels=len(SENTIMENT_LABELS))
    task = ClassificationTask(train, dev, tokenizer, SENTIMENT_LABELS, config, args.batch_size, rank, world_size)
    return task, sha256_file(args.train)


def _teacher(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .teacher import TeacherConfig, TeacherTrainConfig, TeacherUnavailable, fine_tune

    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["lstm-train", *(sys.argv[1:] if argv is None else argv)])
    try:
        train, dev = read_sst2(args.train), read_sst2(args.dev)
        best = fine_tune(
            train,
            dev,
            args.out,
            TeacherConfig(max_len=args.max_len),
            TeacherTrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                eval_every=args.eval_every,
                seed=args.seed,
                max_train=args.max_train,
                freeze_embeddings=args.freeze_embeddings,
            ),
            data_sha256=sha256_file(args.train),
            command=command,
        )
    except (DataError, TeacherUnavailable) as error:
        print(f"lstm-train: {error}", file=sys.stderr)
        return 2
    print(f"best: {best}")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from .teacher import TeacherUnavailable

    if args.threads:
        torch.set_num_threads(args.threads)
    augment_config = AugmentConfig(**{f.name: getattr(args, f.name) for f in fields(AugmentConfig)})
    try:
        summary = build_transfer(
            args.teacher, read_sst2(args.train), args.out, augment_config, data_sha256=sha256_file(args.train)
        )
    except (DataError, TeacherUnavailable, ValueError) as error:
        print(f"lstm-train: {error}", file=sys.stderr)
        return 2
    print(f"transfer: {summary}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    try:
        runs = {
            path: load_checkpoint(path, expected_kind="sentiment")["best"]["val_accuracy"] for path in args.checkpoints
        }
    except CheckpointError as error:
        print(f"lstm-train: {error}", file=sys.stderr)
        return 2
    for path, value in runs.items():
        print(f"{path}: dev accuracy {100 * value:.2f}%")
    values = torch.tensor(list(runs.values()), dtype=torch.float64) * 100
    spread = values.std().item() if len(values) > 1 else 0.0
    print(
        f"{len(values)} runs: mean {values.mean().item():.2f}%, std {spread:.2f}, "
        f"min {values.min().item():.2f}%, max {values.max().item():.2f}%"
    )
    if args.compact_best:
        best = max(runs, key=runs.get)
        compact_checkpoint(best, args.compact_best)
        print(f"best: {best} -> {args.compact_best}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model == "teacher":
        return _teacher(args, argv)
    if args.model == "transfer":
        return _transfer(args)
    if args.model == "summary":
        return _summary(args)
    if args.model == "compact":
        try:
            compact_checkpoint(args.checkpoint, args.out)
        except CheckpointError as error:
            print(f"lstm-train: {error}", file=sys.stderr)
            return 2
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lstm-train: --device cuda asked for, but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    distributed = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank)
    command = shlex.join(["lstm-train", *(sys.argv[1:] if argv is None else argv)])
    try:
        task, data_sha256 = make_task(args, distributed.rank, distributed.world_size)
        trainer = Trainer(task, _pick(args, TrainConfig), args.out, device, distributed, data_sha256, command)
        if args.resume:
            trainer.resume(args.resume)
        best = trainer.fit()
    except (DataError, CheckpointError, TransferError, TrainingDiverged, ValueError) as error:
        print(f"lstm-train: {error}", file=sys.stderr)
        return 3 if isinstance(error, TrainingDiverged) else 2
    finally:
        if distributed.world_size > 1:
            torch.distributed.destroy_process_group()
    if distributed.is_main:
        print(f"best: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
