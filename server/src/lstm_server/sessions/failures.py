"""The engine's typed row failures (``RowFailure``) in words: what failed for which session, what its state kept,
and what the caller can do next."""

from __future__ import annotations

from ..engine.faults import ENGINE, NON_FINITE, PROMPT, SAMPLE, RowFailure
from ..errors import ServiceError, Status


class SessionStepError(ServiceError):
    """One turn's row failed alone; its slot's state and count are as they were before that step."""


def _error(failure: RowFailure, code: Status, message: str) -> SessionStepError:
    error = SessionStepError(code, message, reason=failure.kind)
    error.__cause__ = failure.cause
    return error


def _prompt_error(failure: RowFailure, session_id: str, kept: str) -> SessionStepError:
    if failure.kind == NON_FINITE:
        return _error(
            failure,
            Status.FAILED_PRECONDITION,
            f"session {session_id}'s state became non-finite (NaN or infinity) while reading the prompt "
            f"({failure.chars} characters); {kept}",
        )
    return _error(
        failure,
        Status.INTERNAL,
        f"model step failed for session {session_id} while reading the prompt: {failure.cause}; {kept}",
    )


def turn_error(failure: RowFailure, session_id: str) -> ServiceError:
    """The error that ends a turn whose row failed: a ``SessionStepError`` (the state kept is consistent and is
    saved), or for a failure of the engine itself a plain INTERNAL (the state is not trusted)."""
    if failure.phase == ENGINE:
        error = ServiceError(Status.INTERNAL, f"generation failed: {failure.cause}")
        error.__cause__ = failure.cause
        return error
    not_read = f"the prompt was not read: the session keeps its state after {failure.kept} characters"
    if failure.phase == PROMPT:
        return _prompt_error(
            failure, session_id, f"{not_read}; it can be exported or continued with another prompt, or closed"
        )
    if failure.phase == SAMPLE:
        return _error(
            failure, Status.INTERNAL, f"sampling failed for session {session_id}: {failure.cause}; {not_read}"
        )
    kept = (
        f"the step was not applied: the session keeps its state after {failure.kept} characters (the last character "
        "sent was not read into it)"
    )
    if failure.kind == NON_FINITE:
        return _error(
            failure,
            Status.FAILED_PRECONDITION,
            f"session {session_id}'s state became non-finite (NaN or infinity) on reading the characters after the "
            f"first {failure.kept}; {kept}. It can still be exported, or continued with another prompt or sampling "
            "(the same continuation fails the same way); or close it and start a new one",
        )
    return _error(
        failure,
        Status.INTERNAL,
        f"model step failed for session {session_id}: {failure.cause}; {kept}. Retry the turn, or export or close "
        "the session",
    )


def read_error(failure: RowFailure, session_id: str) -> ServiceError:
    """The error of a session's prompt read (CreateSession's prompt) that failed; nothing was written."""
    return _prompt_error(failure, session_id, "the prompt was not read (try another prompt)")


def step_error(failure: RowFailure) -> ServiceError:
    """The error of a Step call that failed; nothing is kept."""
    if failure.kind == NON_FINITE:
        return ServiceError(
            Status.FAILED_PRECONDITION,
            "the model's output for this input and state is not finite (NaN or infinity); nothing was kept: send h "
            "and c as this model returned them, with finite values (or neither, for a fresh sequence)",
            reason=NON_FINITE,
        )
    error = ServiceError(Status.INTERNAL, f"model step failed: {failure.cause}", reason=failure.kind)
    error.__cause__ = failure.cause
    return error
