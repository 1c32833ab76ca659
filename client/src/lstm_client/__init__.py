"""Python client for the LSTM serving API (grpcio and protobuf messages only).

from lstm_client import Client, TlsConfig
with Client("gateway.example:443", token="...", tls=TlsConfig(ca="ca.pem")) as client:
    client.classify(["a gorgeous film"], model="sentiment")[0].label
    with client.session(model="charlm") as session:
        for chunk in session.generate("ROMEO:", max_tokens=200, temperature=0.8, seed=7):
            print(chunk.text, end="", flush=True)
    with client.chat(model="charlm", prompt="ROMEO:") as chat:  # the Chat stream, turn after turn
        print("".join(chunk.text for chunk in chat.send(" What light", max_tokens=100)))

``AsyncClient`` is the asyncio twin; docs/client.md says it all (deadlines, retries, errors, the CLI).
"""

from .aio import AsyncChat, AsyncClient, AsyncSession
from .chat import Chat
from .client import Client, Session
from .errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    LstmError,
    NotFound,
    ResourceExhausted,
    SessionBusy,
    Unavailable,
)
from .results import Chunk, ClassifyResult, StepResult
from .tensors import make_tensor, tensor_shape, tensor_values
from .transport import InsecureTokenWarning, TlsConfig

__all__ = [
    "AsyncChat",
    "AsyncClient",
    "AsyncSession",
    "Cancelled",
    "Chat",
    "Chunk",
    "ClassifyResult",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "InsecureTokenWarning",
    "InvalidArgument",
    "LstmError",
    "NotFound",
    "ResourceExhausted",
    "Session",
    "SessionBusy",
    "StepResult",
    "TlsConfig",
    "Unavailable",
    "make_tensor",
    "tensor_shape",
    "tensor_values",
]
