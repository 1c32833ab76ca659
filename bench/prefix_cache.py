"""The prefix cache, A/B: time to first character of new sessions after a shared 2,000-character opening, with the
cache and with it off; the cost of a miss; the memory of a checkpoint.

Two lstm-server processes on the same model repository, one with the defaults (the cache on) and one with
``--prefix-cache-bytes 0``, started once. Every new session is CreateSession (no prompt) then a first Generate of
``opening + question`` (a question of its own) for one character: the time from before CreateSession to that
character. Hits: every session shares the opening (the cache warmed by two sessions first, so that it holds the
state where their questions part). Misses: every session's opening is its own (a random 2,000 characters), so the
cached server looks up, reads it all and writes its checkpoints. Rounds alternate the servers (ABBA, BAAB, ...);
reported are medians over rounds of each round's median, the ratio off / on, and for misses the server's CPU time
per session (from /proc: it moves less with the neighbours' load than wall time). Targets (issue 22): hits at
least 20x shorter at 1 and 64 sessions; a miss within 2% of uncached.

    .venv/bin/python bench/prefix_cache.py [--models models] [--rounds 6] [--concurrency 1 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from pathlib import Path

import grpc
import numpy as np
from auth_overhead import cpu_seconds
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc
from serve_generation import cluster, start_server

from lstm_server.app import engine_for
from lstm_server.config import ServerConfig
from lstm_server.metrics import Metrics
from lstm_server.runtime.registry import ModelRegistry

PASSAGE = (
    "You are a player in a company of actors. Answer in verse, as the characters of the plays would, and keep "
    "to the part you are given.\n\nFirst Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n"
    "Speak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
)
OPENING_CHARS = 2000


def opening(rng: random.Random | None = None) -> str:
    """The shared opening; with ``rng``, a random one of the same length (a miss)."""
    if rng is None:
        return (PASSAGE * (OPENING_CHARS // len(PASSAGE) + 1))[:OPENING_CHARS]
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.\n") for _ in range(OPENING_CHARS))


async def first_character(stubs: tuple, text: str) -> float:
    """A new session reading ``text`` in its first turn: seconds to its first character (then closed)."""
    sessions, generation = stubs
    started = time.perf_counter()
    session = await sessions.CreateSession(pb.CreateSessionRequest(model="charlm"))
    request = pb.GenerateRequest(session_id=session.session_id, prompt=text, sampling={"max_tokens": 1})
    async for _ in generation.Generate(request):
        break
    took = time.perf_counter() - started
    await sessions.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
    return took


async def round_of(stubs: tuple, texts: list[str], concurrency: int) -> float:
    """The median time to first character of ``texts``, ``concurrency`` new sessions at a time."""
    times: list[float] = []
    for at in range(0, len(texts), concurrency):
        times += await asyncio.gather(*(first_character(stubs, t) for t in texts[at : at + concurrency]))
    return statistics.median(times)


def questions(rng: random.Random, n: int) -> list[str]:
    """Questions of their own (their first characters differ from one another's, mostly)."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return ["".join(rng.choice(letters) for _ in range(6)) + ": what news?\n" for _ in range(n)]


async def bench(args: argparse.Namespace, servers: dict[str, cluster.Process]) -> None:
    channels = {name: grpc.aio.insecure_channel(s.address) for name, s in servers.items()}
    stubs = {name: (rpc.SessionsStub(ch), rpc.GenerationStub(ch)) for name, ch in channels.items()}
    rng = random.Random(22)
    shared = opening()
    for name in servers:  # warm both; the cached one then holds the state where two questions part
        await round_of(stubs[name], [shared + q for q in questions(rng, 3)], 1)
    print(
        "| case | sessions at once | rounds | cache off TTFT (median) | cache on TTFT (median) | off / on (median "
        "of rounds) | min / max of rounds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for concurrency in args.concurrency:
        n = max(concurrency, 5)
        ratios, times = [], {"on": [], "off": []}
        for r in range(args.rounds):
            texts = [shared + q for q in questions(rng, n)]
            got = {}
            for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                got[name] = await round_of(stubs[name], texts, concurrency)
                times[name].append(got[name])
            ratios.append(got["off"] / got["on"])
        print(
            f"| hit (shared opening + own question) | {concurrency} | {args.rounds} "
            f"| {statistics.median(times['off']) * 1000:.1f} ms | {statistics.median(times['on']) * 1000:.2f} ms "
            f"| {statistics.median(ratios):.1f}x | {min(ratios):.1f}x / {max(ratios):.1f}x |"
        )
    ratios, times, cpu = [], {"on": [], "off": []}, {"on": [], "off": []}
    for r in range(args.rounds * 2):
        texts = [opening(rng) for _ in range(args.miss_sessions)]
        got = {}
        for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
            before = cpu_seconds(servers[name].pid)
            got[name] = await round_of(stubs[name], texts, 1)
            cpu[name].append((cpu_seconds(servers[name].pid) - before) / len(texts))
            times[name].append(got[name])
        ratios.append(got["on"] / got["off"])
    print(
        f"| miss (an opening of its own) | 1 | {args.rounds * 2} | {statistics.median(times['off']) * 1000:.1f} ms "
        f"| {statistics.median(times['on']) * 1000:.1f} ms | on / off {statistics.median(ratios):.3f} "
        f"| {min(ratios):.3f} / {max(ratios):.3f} |"
    )
    print(
        f"\nmiss, server CPU per session (median of rounds): off {statistics.median(cpu['off']) * 1000:.1f} ms, "
        f"on {statistics.median(cpu['on']) * 1000:.1f} ms, on / off "
        f"{statistics.median(cpu['on']) / statistics.median(cpu['off']):.3f}"
    )
    listing = await rpc.ModelsStub(channels["on"]).ListPrefixCache(pb.ListPrefixCacheRequest(model="charlm"))
    sizes = {e.bytes for e in listing.entries}
    print(f"checkpoints held: {len(listing.entries)}; state bytes per checkpoint: {sorted(sizes)}")
    for channel in channels.values():
        await channel.close()


def miss_in_process(args: argparse.Namespace) -> None:
    """A miss as the prefill thread does it, in this process: one engine with the cache, one without, each reading
    fresh random 2,000-character prompts (the lookup, the read with its stops, the checkpoint writes, against the
    read alone), alternating, medians of wall time and of this thread's CPU time (one intra-op thread: the reads
    run on this thread, and its CPU time moves little with the neighbours' load)."""
    config = ServerConfig(models=str(args.models), threads=1, port=0, metrics_port=0, http_port=0)
    loaded = ModelRegistry(config).models["charlm"]
    engines = {
        "on": engine_for(loaded, config, Metrics()),
        "off": engine_for(loaded, config.model_copy(update={"prefix_cache_bytes": 0}), Metrics()),
    }
    rng = np.random.default_rng(22)
    times: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(args.in_process_reads):
        tokens = rng.integers(1, len(engines["on"].codec), OPENING_CHARS)
        for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
            engine = engines[name]
            h, c = engine.slots.gather(np.array([0]))
            keep: list = []
            started, started_cpu = time.perf_counter(), time.thread_time()
            engine._read([tokens], [engine.cache_use("bench")], h, c, lambda _: None, keep)
            engine._keep(keep)
            cpu[name].append(time.thread_time() - started_cpu)
            times[name].append(time.perf_counter() - started)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    on_cpu, off_cpu = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    print(
        f"miss in process, one thread ({args.in_process_reads} reads each, alternating): read alone {off * 1000:.1f} "
        f"ms wall, {off_cpu * 1000:.1f} ms CPU; with lookup, stops and checkpoint writes {on * 1000:.1f} ms wall, "
        f"{on_cpu * 1000:.1f} ms CPU: on / off {on / off:.4f} wall, {on_cpu / off_cpu:.4f} CPU; "
        f"{len(engines['on'].cache)} checkpoints, {engines['on'].cache.bytes / len(engines['on'].cache):.0f} bytes "
        "each with their nodes and text"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--miss-sessions", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--in-process-reads", type=int, default=40)
    args = parser.parse_args()
    miss_in_process(args)
    servers = {
        "on": start_server(args.models, args.threads),
        "off": start_server(args.models, args.threads, extra=("--prefix-cache-bytes", "0")),
    }
    try:
        asyncio.run(bench(args, servers))
    finally:
        for server in servers.values():
            cluster.stop(server)


if __name__ == "__main__":
    main()
