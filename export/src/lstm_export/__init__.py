"""Export of LSTM checkpoints to TorchScript and ONNX (built in the issue "Export")."""
