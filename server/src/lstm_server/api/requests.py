"""Checking request fields before any layer below acts on them: texts, unknown-character rules, proposed session
ids, pages and Classify batches. (Sampling parameters are checked against the session's defaults by the sessions
layer, ``sessions/session.py``; session states by ``state.py``.)"""

from __future__ import annotations

import re

import grpc
from lstm.v1 import lstm_pb2 as pb

from ..config import ServerConfig
from ..engine.codec import REJECT, REPLACE, SKIP
from ..errors import invalid, shown

UNKNOWN_POLICY = {
    pb.UNKNOWN_CHARACTERS_UNSPECIFIED: REJECT,
    pb.UNKNOWN_CHARACTERS_REJECT: REJECT,
    pb.UNKNOWN_CHARACTERS_SKIP: SKIP,
    pb.UNKNOWN_CHARACTERS_REPLACE: REPLACE,
}
SESSION_ID = re.compile(r"[0-9a-f]{32}")


def unknown_policy(value: int) -> str:
    """The rule for unknown characters; INVALID_ARGUMENT for a number outside the enum."""
    policy = UNKNOWN_POLICY.get(value)
    if policy is None:
        names = ", ".join(f"{pb.UnknownCharacters.Name(v)} ({v})" for v in UNKNOWN_POLICY)
        raise invalid(
            f"unknown_characters {value} is not one of {names}", reason="INVALID_ENUM", field="unknown_characters"
        )
    return policy


def check_prompt(text: str | list[int], config: ServerConfig, what: str = "prompt") -> None:
    if len(text) > config.max_prompt_chars:
        raise invalid(
            f"{what} has {len(text)} characters; the limit is {config.max_prompt_chars} (max_prompt_chars)",
            reason="PROMPT_TOO_LONG",
            field=what,
        )


def check_proposed_id(session_id: str) -> str:
    """A client-proposed session id (``x-session-id`` metadata on create or import), or "" for none."""
    if session_id and not SESSION_ID.fullmatch(session_id):
        raise invalid(
            f"x-session-id {shown(session_id)} is not a session id: propose 32 lowercase hex digits (128 random "
            "bits), or send no x-session-id and the server picks one",
            reason="INVALID_SESSION_ID",
            field="x-session-id",
        )
    return session_id


def proposed_session_id(context: grpc.aio.ServicerContext) -> str:
    """The session id a client proposes on create or import (``x-session-id`` metadata), or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-session-id":
            return check_proposed_id(value)
    return ""


def page_size(requested: int, config: ServerConfig) -> int:
    """ListSessions' page size: the default for 0, at most the largest page."""
    if requested < 0:
        raise invalid(
            f"page_size must be >= 0 (0: the default of {config.list_page_size}), got {requested}",
            reason="INVALID_PAGE",
            field="page_size",
        )
    return min(requested or config.list_page_size, config.list_max_page_size)


def check_classify(texts: list[str], config: ServerConfig) -> None:
    """A Classify call's texts: at least one, none empty, within the count and length limits."""
    if not texts:
        raise invalid("Classify needs at least one text", reason="NO_TEXTS", field="texts")
    if len(texts) > config.max_classify_texts:
        raise invalid(
            f"{len(texts)} texts in one call; the limit is {config.max_classify_texts} (max_classify_texts): split "
            "the batch",
            reason="TOO_MANY_TEXTS",
            field="texts",
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise invalid(
                f"texts[{i}] is empty (or only whitespace): there is nothing to classify; leave it out",
                reason="EMPTY_TEXT",
                field=f"texts[{i}]",
            )
        if len(text) > config.max_classify_chars:
            raise invalid(
                f"texts[{i}] has {len(text)} characters; the limit is {config.max_classify_chars} (max_classify_chars)",
                reason="TEXT_TOO_LONG",
                field=f"texts[{i}]",
            )
