"""The Chat wrapper (sync and asyncio) against the real server: turns carry the session, they equal the same turns
through Generate, the session ends with the stream unless kept or named, and a stopped or failed turn keeps a
session that outlives its stream."""

from __future__ import annotations

import asyncio

import pytest

from lstm_client import AsyncClient, Client, FailedPrecondition, InvalidArgument, Session

TURNS = [("\nthe", 12), ("\nyes", 9)]


def generated(client: Client) -> list[str]:
    """What TURNS produce through Generate on a session made like the chats below."""
    with client.session(model="charlm", prompt="KING:", seed=5) as session:
        return ["".join(c.text for c in session.generate(text, max_tokens=n)) for text, n in TURNS]


def listed(client: Client) -> set[str]:
    return {s.session_id for s in client.list_sessions("charlm", page_size=1000)}


def wait_until_free(session: Session) -> int:
    """The session's count once the server has freed it after a stopped turn (a bounded wait on the server)."""
    for _ in range(10_000):
        info = session.refresh()
        if not info.busy:
            return info.tokens_seen
    raise AssertionError("the session stayed busy")


def test_chat_turns_carry_the_session_and_equal_generate(server) -> None:
    with Client(server.address) as client:
        with client.chat(model="charlm", prompt="KING:", seed=5) as chat:
            assert len(chat.session_id) == 32 and chat.tokens_seen == len("KING:")
            assert chat.session_id in listed(client)
            answers = []
            for text, n in TURNS:
                chunks = list(chat.send(text, max_tokens=n))
                assert chunks[-1].finish_reason == "length" and chunks[-1].tokens_seen == chat.tokens_seen
                answers.append("".join(c.text for c in chunks))
            assert chat.tokens_seen == len("KING:") + sum(len(text) + n for text, n in TURNS)
        assert answers == generated(client)
        assert chat.session_id not in listed(client)  # created by the stream: closed with it


def test_keep_session_keeps_it_after_the_stream(server) -> None:
    (first_text, first_n), (second_text, second_n) = TURNS
    with Client(server.address) as client:
        with client.chat(model="charlm", prompt="KING:", seed=5, keep_session=True) as chat:
            first = "".join(c.text for c in chat.send(first_text, max_tokens=first_n))
        with client.attach(chat.session_id) as session:
            assert session.info.tokens_seen == chat.tokens_seen
            second = "".join(c.text for c in session.generate(second_text, max_tokens=second_n))
        assert [first, second] == generated(client)


def test_a_stopped_answer_keeps_a_named_session_and_the_conversation_goes_on(server) -> None:
    with Client(server.address) as client, client.session(model="charlm", prompt="KING:") as session:
        with session.chat() as chat:
            for chunk in chat.send("\nthe", max_tokens=4000):
                assert chunk.text
                break  # ends the stream and with it the turn
            seen = wait_until_free(session)
            assert len("KING:\nthe") < seen < len("KING:\nthe") + 4000
            chunks = list(chat.send("\nno", max_tokens=7))  # a new stream on the same session
            assert chunks[-1].tokens_seen == seen + len("\nno") + 7 == chat.tokens_seen
            with pytest.raises(InvalidArgument, match="vocabulary"):
                list(chat.send("§"))  # a failed turn ends the stream too
            assert [c.finish_reason for c in chat.send("\n", max_tokens=2)][-1] == "length"
        assert session.refresh().tokens_seen == seen + len("\nno") + 7 + len("\n") + 2


def test_a_stopped_answer_ends_a_session_the_stream_owns(server) -> None:
    with Client(server.address) as client, client.chat(model="charlm", prompt="KING:") as chat:
        for _ in chat.send("\nthe", max_tokens=4000):
            break
        with pytest.raises(FailedPrecondition, match="ended with the Chat stream that created it"):
            list(chat.send("\nmore"))


def test_the_async_chat_is_the_sync_ones_twin(server) -> None:
    (first_text, first_n), (second_text, second_n) = TURNS

    async def run() -> tuple[list[str], list[str], str]:
        async with AsyncClient(server.address) as client:
            async with client.chat(model="charlm", prompt="KING:", seed=5) as chat:
                owned = ["".join([c.text async for c in chat.send(text, max_tokens=n)]) for text, n in TURNS]
            async with client.session(model="charlm", prompt="KING:") as session:
                async with session.chat() as named:
                    answer = named.send("\nthe", max_tokens=4000)
                    await answer.__anext__()
                    await answer.aclose()  # stops the answer: ends the stream, not the named session
                    for _ in range(10_000):
                        if not (await session.refresh()).busy:
                            break
                    assert [c.finish_reason async for c in named.send("\n", max_tokens=2)][-1] == "length"
                assert named.session_id == session.id
            async with client.session(model="charlm", prompt="KING:", seed=5) as session:
                async with session.chat() as named:
                    first_again = "".join([c.text async for c in named.send(first_text, max_tokens=first_n)])
                second = "".join([c.text async for c in session.generate(second_text, max_tokens=second_n)])
            return owned, [first_again, second], chat.session_id

    with Client(server.address) as client:
        owned, named, session_id = asyncio.run(run())
        assert owned == named == generated(client) and session_id not in listed(client)
