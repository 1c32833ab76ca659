"""The api layer: the gRPC services (``servicers.py``), the interceptor that authenticates every call and turns
``ServiceError`` into its status (``interceptors.py``, ``auth.py``), request validation (``requests.py``), and the
conversions to and from protobuf (``messages.py``; session states, signed: ``state.py``, ``state_signing.py``).
The only layer that imports grpc status codes or ``lstm.v1``."""
