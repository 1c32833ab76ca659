"""A turn its client stops: how far the server generates past what the client read, and how soon the session takes
the next turn (docs/server.md, Cancellation)."""

from __future__ import annotations

import time

from lstm_client import Client

PROMPT = "KING:\n"


def test_a_turn_sent_right_after_a_cancelled_one_runs_without_busy(server) -> None:
    """Leaving a turn and sending the next at once is not refused as busy (the server waits for the cancelled
    turn to settle): the next turn continues where the cancelled one left the session."""
    with Client(server.address, retries=0) as client, client.session(model="charlm", prompt=PROMPT) as session:
        for round_ in range(10):
            stream = session.generate(max_tokens=3000, seed=round_)
            for _ in stream:
                break
            stream.close()  # cancels the call; the next turn goes at once
            before = session.refresh().tokens_seen if round_ % 2 else None
            text = "".join(chunk.text for chunk in session.generate(max_tokens=5, seed=round_))
            assert len(text) == 5
            if before is not None:
                assert session.tokens_seen == before + 5


def test_characters_generated_past_what_a_client_that_stopped_reading_received(start_server) -> None:
    """The documented bound: a client that stops reading mid-turn gets at most ``stream_buffer_chars`` plus
    what gRPC's flow control lets through (the client's HTTP/2 stream window) generated past what it read."""
    limit = 200_000
    server = start_server(max_tokens_limit=limit)
    with Client(server.address, retries=0) as client, client.session(model="charlm", prompt=PROMPT) as session:
        stream = session.generate(max_tokens=limit, seed=3)
        received = len(next(stream).text)
        deadline, previous = time.monotonic() + 30, -1
        while time.monotonic() < deadline:  # the turn runs until every buffer is full, then sits out of the batch
            time.sleep(0.5)
            progress = client.attach(session.id).tokens_seen
            if progress == previous:
                break
            previous = progress
        stream.close()
        generated = previous - len(PROMPT)
        print(f"received {received}, generated {generated}")
        assert generated < limit, "the turn was not held back at all"
