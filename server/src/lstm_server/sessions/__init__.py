"""The sessions layer: the session table, the lifecycle of a session and its turns (``manager.py``), and the
stores behind one protocol (``store.py``: memory; ``redis_store.py``: Redis). It owns every Session and writes it
on the event loop only; it drives the engine and imports neither grpc nor protobuf."""
