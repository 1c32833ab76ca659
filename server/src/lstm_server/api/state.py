"""Session states as signed ``SessionState`` messages, and back.

A state leaves the server signed (``state_signing.py``) and comes back only as
it left: ExportSession returns the signed message, ImportSession checks the
signature and the tenant before reading any field, then every field against
the model and the limits. The session store keeps the same signed message,
serialized, and a state loaded from it passes the same checks (DATA_LOSS when
it does not parse or is not signed by this deployment). The signature is
checked on the message as received, before any field is turned into a value:
a plain value cannot hold the malformed fields a forged message may carry.

``StateMessages`` is the ``StateCodec`` the sessions layer is given (it cannot
read protobuf itself).
"""

from __future__ import annotations

from lstm.v1 import lstm_pb2 as pb

from ..config import ServerConfig
from ..engine.models import ServedModels
from ..errors import ServiceError, Status, invalid
from ..sessions.session import SessionState
from .messages import from_tensor, sampling_dict, sampling_params, to_tensor
from .state_signing import StateSigner

MAX_TOKENS_SEEN = 2**53  # far beyond any real session; keeps counts exact in float64 and int64 everywhere


class StateMessages:
    """Converts session states to signed messages and bytes, and checks the ones that come back."""

    def __init__(self, signer: StateSigner, models: ServedModels, config: ServerConfig) -> None:
        self.signer = signer
        self.models = models
        self.config = config

    def message(self, state: SessionState) -> pb.SessionState:
        """The state as a signed message (what ExportSession returns)."""
        logits = to_tensor(state.next_logits) if state.next_logits is not None else pb.Tensor()
        message = pb.SessionState(
            model=state.model,
            model_version=state.model_version,
            tokens_seen=state.tokens_seen,
            h=to_tensor(state.h),
            c=to_tensor(state.c),
            next_logits=logits,
            defaults=sampling_params(state.defaults),
            tenant=state.tenant,
        )
        return self.signer.sign(message)

    def encode(self, state: SessionState) -> bytes:
        """The signed message, serialized (what a session store keeps)."""
        return self.message(state).SerializeToString()

    def check_signed(self, message: pb.SessionState, tenant: str, code: Status, what: str) -> None:
        """Refuse a state that this deployment did not sign, or that another tenant's session wrote."""
        problem = self.signer.verify(message)
        if problem:
            raise ServiceError(
                code,
                f"{what} is refused: {problem}; states can only be brought back as exported",
                reason="STATE_SIGNATURE_INVALID",
                field="state" if code is Status.INVALID_ARGUMENT else None,
            )
        if message.tenant != tenant:
            raise ServiceError(
                Status.PERMISSION_DENIED,
                f"{what} belongs to another tenant; import states your own sessions exported",
                reason="STATE_OTHER_TENANT",
            )

    def state(self, message: pb.SessionState, tenant: str) -> SessionState:
        """An imported state: signed by this deployment for this tenant, written by the model version this server
        runs, and every field within what the model and the limits allow."""
        self.check_signed(message, tenant, Status.INVALID_ARGUMENT, "this session state")
        return self._fields(message)

    def _fields(self, message: pb.SessionState) -> SessionState:
        """A signed state's fields, checked against the model and the limits. (Its sampling defaults are
        checked where the session is made from it.)"""
        model = self.models.of_task(message.model, "generation", "state.model")
        if message.model_version != model.version:
            raise ServiceError(
                Status.FAILED_PRECONDITION,
                f"this state was written by {message.model} version {message.model_version}, but this server runs "
                f"version {model.version}; states do not carry over between versions (pin the version with "
                "--model-versions, or start a new session)",
                reason="MODEL_VERSION_MISMATCH",
                field="state.model_version",
            )
        if message.tokens_seen > MAX_TOKENS_SEEN:
            raise invalid(
                f"state.tokens_seen {message.tokens_seen} is beyond the limit of {MAX_TOKENS_SEEN}",
                reason="INVALID_STATE",
                field="state.tokens_seen",
            )
        engine = model.engine
        shape = engine.slots.slot_shape
        # h = o * tanh(c) lies in [-1, 1]; c moves by at most 1 per character (|f c + i g| <= |c| + 1)
        h = from_tensor(message.h, shape, "state.h", bound=1.0)
        c = from_tensor(message.c, shape, "state.c", bound=float(message.tokens_seen))
        has_logits = bool(message.next_logits.shape)
        if has_logits != (message.tokens_seen > 0):
            raise invalid(
                "state.next_logits must be given exactly when state.tokens_seen is above 0",
                reason="INVALID_STATE",
                field="state.next_logits",
            )
        logits = (
            from_tensor(message.next_logits, (engine.slots.vocab_size,), "state.next_logits") if has_logits else None
        )
        defaults = sampling_dict(message.defaults)
        if "seed" not in defaults:
            raise invalid("state.defaults.seed is missing", reason="INVALID_STATE", field="state.defaults.seed")
        return SessionState(
            message.model, message.model_version, message.tokens_seen, h, c, logits, defaults, message.tenant
        )

    def decode(self, data: bytes, tenant: str, session_id: str) -> SessionState:
        """A state as a session store kept it for ``tenant``'s session ``session_id``."""
        what = f"session {session_id}'s state in the session store"
        try:
            message = pb.SessionState.FromString(data)
        except Exception as error:  # protobuf's DecodeError
            raise ServiceError(
                Status.DATA_LOSS,
                f"{what} cannot be parsed ({error}); close the session, create a new one",
                reason="STORED_STATE_CORRUPT",
            ) from error
        self.check_signed(message, tenant, Status.DATA_LOSS, what)
        return self._fields(message)
