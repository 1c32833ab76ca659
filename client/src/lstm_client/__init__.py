"""Python client for the LSTM serving API (built in the issue "gRPC server")."""
