"""The engine layer: numpy in, numpy out. The scheduler over state slots for a language model
(``generation.py``), the classifier's batcher (``classification.py``), sampling, the slots, the character codec,
and the table of served models. It knows no session, no protobuf and no grpc; it raises ``ServiceError`` with the
project's own ``Status`` codes."""
