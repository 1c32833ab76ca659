"""gRPC server for the LSTM models (built in the issue "gRPC server")."""
