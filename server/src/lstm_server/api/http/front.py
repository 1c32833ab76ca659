"""What the HTTP routes share: the same Api and Open Inference service the gRPC services use, and who is calling."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from ...config import ServerConfig
from ..auth import Authenticator
from ..open_inference import InferenceService
from ..servicers import Api
from .calls import tenant


@dataclass(frozen=True)
class Front:
    api: Api
    inference: InferenceService
    authenticator: Authenticator

    @property
    def config(self) -> ServerConfig:
        return self.api.config

    def tenant(self, request: Request) -> str:
        """The request's tenant (UNAUTHENTICATED without valid credentials)."""
        return tenant(request, self.authenticator)
