"""Training of the LSTM models: reference LSTM, models, data, trainer and the lstm-train CLI."""
