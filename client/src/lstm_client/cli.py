"""lstm-client: chat (interactive, streamed, one session across turns), generate PROMPT..., classify TEXT...
and sessions (the caller's sessions).

Connection: --server (or LSTM_CLIENT_SERVER); TLS with --tls (gRPC's default roots) or --ca FILE (a private CA),
plus --cert FILE --key FILE for a client certificate (mutual TLS); --token or, better, the environment variable
LSTM_CLIENT_TOKEN (a command line is visible to other users of the machine); --timeout (each call's deadline).
Every one of these has its LSTM_CLIENT_* variable. --json prints one JSON object per result line. A - among the
texts or prompts reads more from standard input (UTF-8), one per line.

In chat, Ctrl-C during an answer stops that answer and keeps the session; Ctrl-C at the prompt quits (130).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .client import Client, Session
from .errors import InvalidArgument, LstmError
from .results import ClassifyResult
from .transport import TlsConfig

DEFAULT_BATCH_SIZE = 256  # the server's default max_classify_texts (the API does not say its own)
SETTLE_S = 5.0  # how long chat waits for the server to free the session after a stopped answer


INVALID_UTF8_HINT = (
    "convert the input to UTF-8 (e.g. iconv -f latin1 -t utf-8) or pass --replace-invalid to replace each "
    "undecodable byte with U+FFFD"
)


def utf8(raw: bytes, origin: str, replace_invalid: bool) -> str:
    """``raw`` decoded as UTF-8; a ValueError naming ``origin`` when it is not UTF-8 (unless ``replace_invalid``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if replace_invalid:
            return raw.decode("utf-8", errors="replace")
        raise ValueError(
            f"{origin} is not UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1}): {INVALID_UTF8_HINT}"
        ) from None


def texts_of(arguments: Iterable[str], replace_invalid: bool = False, name: str = "TEXT") -> list[tuple[str, str]]:
    """Each text with where it came from (``TEXT 2``, ``line 5 of standard input``): the arguments, with
    ``-`` replaced by the non-empty lines of standard input, all checked to be UTF-8."""
    texts: list[tuple[str, str]] = []
    for index, argument in enumerate(arguments, 1):
        if argument != "-":  # undecodable bytes of an argument arrive as surrogates: back to bytes
            origin = f"{name} {index}"
            texts.append((utf8(argument.encode("utf-8", "surrogateescape"), origin, replace_invalid), origin))
            continue
        stdin = getattr(sys.stdin, "buffer", sys.stdin)  # bytes; a text stream where a test replaced stdin
        for number, line in enumerate(stdin, 1):
            raw = line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")
            raw = raw.rstrip(b"\r\n")
            if raw:
                origin = f"line {number} of standard input"
                texts.append((utf8(raw, origin, replace_invalid), origin))
    return texts


def emit(args: argparse.Namespace, record: dict[str, Any], line: str) -> None:
    """One result: ``record`` as a JSON line with ``--json``, else ``line``."""
    print(json.dumps(record, ensure_ascii=False) if args.json else line, flush=True)


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed, "stop": args.stop}


def settle(session: Session) -> int:
    """Wait (a few seconds at most) until the server has freed the session after a stopped turn; its count."""
    give_up = time.monotonic() + SETTLE_S
    while (info := session.refresh()).busy and time.monotonic() < give_up:
        time.sleep(0.02)
    return info.tokens_seen


def answer(session: Session, prompt: str, args: argparse.Namespace, *, interruptible: bool = False) -> dict[str, Any]:
    """One turn: streams the answer to the terminal (without ``--json``) and returns its record. With
    ``interruptible``, Ctrl-C stops the turn (``finish_reason`` "cancelled") instead of quitting."""
    record = {"session_id": session.id, "prompt": prompt, "text": "", "finish_reason": None, "tokens_seen": 0}
    stream = session.generate(prompt, unknown_characters="replace")
    try:
        for chunk in stream:
            if not args.json:
                print(chunk.text, end="", flush=True)
            record.update(
                text=record["text"] + chunk.text, finish_reason=chunk.finish_reason, tokens_seen=chunk.tokens_seen
            )
    except KeyboardInterrupt:
        if not interruptible:
            raise
        stream.close()  # cancels the turn; the server keeps what the session read
        record.update(finish_reason="cancelled", tokens_seen=settle(session))
    return record


def history_path(args: argparse.Namespace) -> Path | None:
    """The chat's history file: ``--history``, else $LSTM_CLIENT_HISTORY, else $XDG_STATE_HOME/lstm-client/history
    when XDG_STATE_HOME is set, else ~/.lstm_client_history; none with ``--no-history``."""
    if args.no_history:
        return None
    if args.history:
        return Path(args.history).expanduser()
    state = os.environ.get("XDG_STATE_HOME")
    return Path(state) / "lstm-client" / "history" if state else Path.home() / ".lstm_client_history"


def line_editing(args: argparse.Namespace) -> Callable[[], None]:
    """Readline editing and history for a terminal (when Python has readline); returns what saves the history."""
    if not sys.stdin.isatty():
        return lambda: None
    try:
        import readline  # line editing, once imported
    except ImportError:
        return lambda: None
    path = history_path(args)
    if path is None:
        return lambda: None
    readline.set_history_length(1000)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)

    def save() -> None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
            path.chmod(0o600)  # what you typed is yours

    return save


def chat(client: Client, args: argparse.Namespace) -> int:
    """Each line you type is one turn: it is sent followed by a newline, and the answer streams back until the
    stop string (a blank line by default) or max tokens. Ctrl-C stops an answer; at the prompt it quits."""
    save_history = line_editing(args)
    try:
        with client.session(model=args.model, unknown_characters="replace", **sampling(args)) as session:
            print(
                f"session {session.id} on {args.model}; an empty line or end of input quits, Ctrl-C stops an "
                "answer, Ctrl-C at the prompt quits",
                file=sys.stderr,
            )
            while True:
                try:
                    line = input("" if args.json else "you> ")
                except EOFError:
                    break
                if not line:
                    break
                if not args.json:
                    print(f"{args.model}> ", end="", flush=True)
                try:
                    record = answer(session, line + "\n", args, interruptible=True)
                except LstmError as error:  # this turn failed; the session goes on
                    print(f"\nlstm-client: {error}", file=sys.stderr)
                    continue
                emit(args, record, "")
    finally:
        save_history()
    return 0


def generate(client: Client, args: argparse.Namespace) -> int:
    """Each prompt in a fresh session (closed after it): its continuation, one line per prompt."""
    for prompt, _ in texts_of(args.prompts, args.replace_invalid, "PROMPT"):
        with client.session(model=args.model, unknown_characters="replace", **sampling(args)) as session:
            emit(args, answer(session, prompt, args), "")
    return 0


def in_label_order(result: ClassifyResult, labels: list[str]) -> dict[str, float]:
    """The probabilities in the model's label order (any label the model did not list after, sorted)."""
    rest = sorted(set(result.probabilities) - set(labels))
    return {label: result.probabilities[label] for label in [*labels, *rest] if label in result.probabilities}


def classify(client: Client, args: argparse.Namespace) -> int:
    """Each text's label, in input order, in calls of at most ``--batch-size`` texts; refuses a blank text."""
    texts = texts_of(args.texts, args.replace_invalid)
    for text, origin in texts:
        if not text.strip():
            raise ValueError(f"{origin} is empty or only whitespace: there is nothing to classify; remove it")
    labels: list[str] | None = None  # the model's label order, asked once the first call succeeded
    for start in range(0, len(texts), args.batch_size):
        batch = texts[start : start + args.batch_size]
        try:
            results = client.classify([text for text, _ in batch], model=args.model)
        except InvalidArgument as error:
            if error.reason == "TOO_MANY_TEXTS":
                raise ValueError(f"{error} (this server takes fewer texts per call: lower --batch-size)") from None
            raise
        labels = labels if labels is not None else list(client.describe(args.model).labels)
        for (text, _), result in zip(batch, results, strict=True):
            probabilities = in_label_order(result, labels)
            scores = "  ".join(f"{label} {p:.3f}" for label, p in probabilities.items())
            record = {"text": text, "label": result.label, "probabilities": probabilities}
            emit(args, record, f"{result.label}\t{scores}\t{text}")
    return 0


def sessions(client: Client, args: argparse.Namespace) -> int:
    for info in client.list_sessions(args.model, page_size=args.page_size):
        busy = " busy" if info.busy else ""
        record = {
            "session_id": info.session_id,
            "model": info.model,
            "model_version": info.model_version,
            "tokens_seen": info.tokens_seen,
            "busy": info.busy,
            "created_at": info.created_at,
            "last_used_at": info.last_used_at,
        }
        emit(args, record, f"{info.session_id}\t{info.model}/{info.model_version}\t{info.tokens_seen} characters{busy}")
    return 0


def tls_of(args: argparse.Namespace) -> TlsConfig | bool:
    """TLS when any TLS flag is given; plaintext otherwise."""
    if args.ca or args.cert or args.key or args.server_name:
        return TlsConfig(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
    return bool(args.tls)


def positive(text: str) -> int:
    """A ``--batch-size`` value: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number above 0, not {text!r}")
    return value


def seconds(text: str) -> float:
    """A ``--timeout`` value: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"a number of seconds above 0, not {text!r}")
    return value


def add_sampling(parser: argparse.ArgumentParser, model: str, max_tokens: int, stop: str | None) -> None:
    parser.add_argument("--model", default=model, help=f"the language model (default: {model})")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"characters per answer ({max_tokens})")
    parser.add_argument("--seed", type=int, help="the random stream's seed (default: the server picks one)")
    stops = "a blank line" if stop == "\n\n" else "none"
    parser.add_argument("--stop", default=stop, help=f"an answer ends after this text (default: {stops})")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="lstm-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('lstm-client')}")
    parser.add_argument(
        "--server", default=env("LSTM_CLIENT_SERVER", "localhost:50051"), help="host:port of the server or gateway"
    )
    parser.add_argument(
        "--token",
        default=env("LSTM_CLIENT_TOKEN") or None,
        help="bearer token (default: $LSTM_CLIENT_TOKEN); without TLS only for a server on loopback",
    )
    parser.add_argument("--tls", action="store_true", default=bool(env("LSTM_CLIENT_TLS")), help="TLS, default roots")
    parser.add_argument("--ca", default=env("LSTM_CLIENT_CA") or None, help="PEM file of the CA (implies TLS)")
    parser.add_argument("--cert", default=env("LSTM_CLIENT_CERT") or None, help="client certificate (mutual TLS)")
    parser.add_argument("--key", default=env("LSTM_CLIENT_KEY") or None, help="the client certificate's key")
    parser.add_argument(
        "--server-name", default=env("LSTM_CLIENT_SERVER_NAME") or None, help="name the server certificate holds"
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=env("LSTM_CLIENT_TIMEOUT") or "30",
        metavar="SECONDS",
        help="deadline of each call, each chat answer included (default: $LSTM_CLIENT_TIMEOUT or 30)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per result line")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (each has its own --help)"
    )
    chat_parser = commands.add_parser("chat", help="interactive chat with the language model, one session")
    add_sampling(chat_parser, "charlm", 300, "\n\n")
    chat_parser.add_argument(
        "--history",
        default=env("LSTM_CLIENT_HISTORY") or None,
        metavar="FILE",
        help="line history file (default: $LSTM_CLIENT_HISTORY, $XDG_STATE_HOME/lstm-client/history or "
        "~/.lstm_client_history)",
    )
    chat_parser.add_argument("--no-history", action="store_true", help="keep no line history")
    generate_parser = commands.add_parser("generate", help="continue each prompt, each in a fresh session")
    generate_parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="a prompt; - reads one per line")
    add_sampling(generate_parser, "charlm", 200, None)
    classify_parser = commands.add_parser("classify", help="label each text")
    classify_parser.add_argument("texts", nargs="+", metavar="TEXT", help="a text; - reads one per line")
    classify_parser.add_argument("--model", default="sentiment", help="the classifier (default: sentiment)")
    classify_parser.add_argument(
        "--batch-size",
        type=positive,
        default=DEFAULT_BATCH_SIZE,
        help=f"texts per Classify call, at most the server's max_classify_texts (default: {DEFAULT_BATCH_SIZE})",
    )
    for sub in (generate_parser, classify_parser):
        sub.add_argument(
            "--replace-invalid",
            action="store_true",
            help="replace bytes that are not UTF-8 with U+FFFD (default: refuse)",
        )
    sessions_parser = commands.add_parser("sessions", help="list your sessions")
    sessions_parser.add_argument("--model", default="", help="only this model's")
    sessions_parser.add_argument("--page-size", type=int, default=0, help="sessions per call (default: the server's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tls = tls_of(args)
    except ValueError as error:
        parser.error(str(error))
    run = {"chat": chat, "generate": generate, "classify": classify, "sessions": sessions}[args.command]
    try:
        with Client(args.server, token=args.token, tls=tls, timeout=args.timeout) as client:
            return run(client, args)
    except (LstmError, OSError, ValueError) as error:
        print(f"lstm-client: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
