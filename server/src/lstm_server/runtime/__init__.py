"""The runtime layer: the model repository, the backends that run an entry's graph, and the registry of what this
server loaded. It knows nothing of engines, sessions or gRPC."""
