"""gRPC server for the LSTM models, in four layers; imports only go down.

- ``api/``: the gRPC services, authentication and status codes, request checks, protobuf conversions
- ``sessions/``: the session table, session and turn lifecycle, the memory and Redis stores
- ``engine/``: the scheduler over state slots, the classifier's batcher, sampling (numpy in, numpy out)
- ``runtime/``: the model repository, the backends, the registry of loaded models

Beside them, imported by any layer: ``config``, ``errors``, ``metrics``, ``logs`` (which import none of the
layers) and ``tracing`` (which imports only ``config`` and ``metrics``). At the top, ``app`` (which assembles the
layers) and ``cli``; ``healthcheck`` is a client for container health checks.
"""
