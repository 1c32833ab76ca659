"""Transfer data for distillation: texts, their true labels where known, and the teacher's logits.

The texts are SST-2's training phrases plus sentences augmented from them as in Tang et al. (2019),
"Distilling Task-Specific Knowledge from BERT into Simple Neural Networks", section 3.3: each word is
masked (``[MASK]``) with probability ``p_mask`` or else replaced with probability ``p_substitute`` by
another word, then with probability ``p_ngram`` an n-gram of 1 to 5 words is kept. The paper
substitutes a word of the same part of speech; no tagger is installed here, so the substitute is
drawn from the training words by frequency. Augmented sentences have no label (-1): the student
learns them from the teacher's logits alone.

The file also holds the student's tokenizer, the teacher's WordPiece vocabulary cut down to the
pieces the transfer texts use plus every single character (so any word still splits into pieces),
and the teacher's input embeddings of those pieces, so a student can start from them without the
teacher installed.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import save_atomic

TRANSFER_FORMAT = "lstm-serving-transfer/1"
MASK = "[MASK]"
NO_LABEL = -1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TransferError(RuntimeError):
    """A transfer-data file is missing or not one."""


@dataclass
class AugmentConfig:
    """Tang et al.'s augmentation: per-word mask and substitution probabilities, n-gram sampling."""

    count: int = 60000
    p_mask: float = 0.1
    p_substitute: float = 0.1
    p_ngram: float = 0.25
    max_ngram: int = 5
    seed: int = 1337


def augment(texts: list[str], config: AugmentConfig) -> list[str]:
    """``config.count`` new sentences made from ``texts`` (whitespace-separated words), none equal to a
    text of ``texts`` or to each other; the same texts and config give the same sentences."""
    rng = random.Random(config.seed)
    frequencies = Counter(word for text in texts for word in text.split())
    words, cumulative = list(frequencies), list(accumulate(frequencies.values()))
    sources = [text.split() for text in texts if len(text.split()) >= 2]
    if not sources:
        raise ValueError("augmentation needs texts of at least two words")
    seen = set(texts)
    out: list[str] = []
    attempts = 0
    while len(out) < config.count:
        attempts += 1
        if attempts > 50 * config.count + 1000:
            raise ValueError(f"could only make {len(out)} distinct augmented sentences of {config.count} asked")
        sentence = []
        for word in rng.choice(sources):
            draw = rng.random()
            if draw < config.p_mask:
                sentence.append(MASK)
            elif draw < config.p_mask + config.p_substitute:
                sentence.append(rng.choices(words, cum_weights=cumulative)[0])
            else:
                sentence.append(word)
        if rng.random() < config.p_ngram:
            n = rng.randint(1, min(config.max_ngram, len(sentence)))
            start = rng.randrange(len(sentence) - n + 1)
            sentence = sentence[start : start + n]
        text = " ".join(sentence)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def student_tokenizer_json(teacher_tokenizer_json: str, token_lists: list[list[str]]) -> tuple[str, list[int]]:
    """The teacher's WordPiece tokenizer cut down to the pieces in ``token_lists``, every one-character piece
    and the special tokens, with no truncation, padding or [CLS]/[SEP]; ``[PAD]`` stays id 0. Returns the JSON
    and, for each new id, the teacher's id of the same piece (to pick its embedding)."""
    spec = json.loads(teacher_tokenizer_json)
    vocab: dict[str, int] = spec["model"]["vocab"]
    used = {token for tokens in token_lists for token in tokens}
    keep = [
        token
        for token in vocab
        if token in used or token in SPECIAL_TOKENS or len(token) == 1 or (token.startswith("##") and len(token) == 3)
    ]
    keep.sort(key=vocab.__getitem__)
    if keep[0] != "[PAD]":
        raise ValueError("the teacher's vocabulary must start with [PAD] (id 0)")
    new_vocab = {token: i for i, token in enumerate(keep)}
    spec["model"]["vocab"] = new_vocab
    spec["added_tokens"] = [
        {**added, "id": new_vocab[added["content"]]} for added in spec["added_tokens"] if added["content"] in new_vocab
    ]
    spec["truncation"] = spec["padding"] = spec["post_processor"] = None
    return json.dumps(spec, ensure_ascii=False), [vocab[token] for token in keep]


def build_transfer(
    teacher_path: str | Path,
    train: list[tuple[str, int]],
    out: str | Path,
    augment_config: AugmentConfig,
    batch_size: int = 256,
    data_sha256: str = "",
    log=print,
) -> dict[str, Any]:
    """Write the transfer file (see the module's docstring) for ``train`` and ``augment_config.count``
    augmented sentences, with the teacher's logits on all of them. Returns the payload's summary."""
    from .teacher import accuracy, load_teacher, predict_logits, teacher_model_dir, teacher_tokenizer

    model_dir = teacher_model_dir()
    model, payload = load_teacher(teacher_path, model_dir)
    texts = [text for text, _ in train]
    labels = [label for _, label in train]
    augmented = augment(texts, augment_config) if augment_config.count else []
    all_texts = texts + augmented
    tokenizer = teacher_tokenizer(model_dir, payload["config"]["max_len"])
    encodings = tokenizer.encode_batch(all_texts)
    log(f"transfer: {len(texts)} training texts + {len(augmented)} augmented; teacher logits ...")
    logits = predict_logits(model, [e.ids for e in encodings], batch_size)
    log(f"transfer: teacher accuracy on the training texts {accuracy(logits[: len(texts)], labels):.4f}")
    plain = teacher_tokenizer(model_dir, max_len=None)
    pieces = [e.tokens for e in plain.encode_batch(all_texts, add_special_tokens=False)]
    tokenizer_json, teacher_ids = student_tokenizer_json(plain.to_str(), pieces)
    embeddings = model.encoder.get_input_embeddings().weight.detach()[teacher_ids].clone()
    summary = {
        "texts": len(all_texts),
        "labelled": len(texts),
        "augmented": len(augmented),
        "student_vocab": len(teacher_ids),
        "teacher_train_accuracy": accuracy(logits[: len(texts)], labels),
        "teacher_dev_accuracy": payload["best"]["dev_accuracy"],
    }
    save_atomic(
        {
            "format": TRANSFER_FORMAT,
            "texts": all_texts,
            "labels": labels + [NO_LABEL] * len(augmented),
            "logits": logits,
            "tokenizer": tokenizer_json,
            "embeddings": embeddings,
            "augment": asdict(augment_config),
            "teacher_command": payload["command"],
            "teacher_best": payload["best"],
            "data_sha256": data_sha256,
            "summary": summary,
        },
        out,
    )
    return summary


def load_transfer(path: str | Path) -> dict[str, Any]:
    """A transfer file written by :func:`build_transfer`."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise TransferError(f"transfer data {path} does not exist: write it with 'lstm-train transfer'") from error
    if not isinstance(payload, dict) or payload.get("format") != TRANSFER_FORMAT:
        raise TransferError(f"{path} is not a {TRANSFER_FORMAT} file")
    return payload


def check_shapes(payload: dict[str, Any]) -> tuple[int, int]:
    """(texts, labels per text) of a transfer payload, after checking its parts agree."""
    logits: Tensor = payload["logits"]
    n = len(payload["texts"])
    if logits.shape[0] != n or len(payload["labels"]) != n:
        raise TransferError(f"transfer data: {n} texts, {len(payload['labels'])} labels, {logits.shape[0]} logits")
    return n, logits.shape[1]
