"""Text to token ids for the character model, with an explicit rule for characters it never saw."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import ServiceError, Status

REJECT, SKIP, REPLACE = "reject", "skip", "replace"


class CharCodec:
    """The vocabulary of a character model: characters in id order."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = list(vocab)
        self.index = {ch: i for i, ch in enumerate(self.vocab)}
        self.replacement = " " if " " in self.index else self.vocab[0]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, policy: str = REJECT) -> np.ndarray:
        """int64 ids of ``text``; unknown characters rejected (INVALID_ARGUMENT), skipped or replaced."""
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            if policy == REJECT:
                shown = "".join(unknown[:20])
                raise ServiceError(
                    Status.INVALID_ARGUMENT,
                    f"characters not in the model's vocabulary: {shown!r}; remove them, or set "
                    "unknown_characters to SKIP or REPLACE",
                    reason="UNKNOWN_CHARACTERS",
                )
            if policy == SKIP:
                text = "".join(ch for ch in text if ch in self.index)
            else:
                text = "".join(ch if ch in self.index else self.replacement for ch in text)
        return np.fromiter((self.index[ch] for ch in text), dtype=np.int64, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def validate_ids(self, ids: list[int]) -> np.ndarray:
        bad = sorted({i for i in ids if not 0 <= i < len(self.vocab)})
        if bad:
            raise ServiceError(
                Status.INVALID_ARGUMENT,
                f"token ids out of range [0, {len(self.vocab)}): {bad[:20]}",
                reason="TOKEN_OUT_OF_RANGE",
                field="tokens.ids",
            )
        return np.asarray(ids, dtype=np.int64)
