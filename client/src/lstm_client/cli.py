"""``lstm-client chat`` (interactive, streamed, one session across turns), ``lstm-client classify TEXT...`` and
``lstm-client sessions`` (the caller's sessions).

Connection: ``--server`` (or LSTM_CLIENT_SERVER); TLS with ``--tls`` (gRPC's default roots) or ``--ca FILE`` (a
private CA), plus ``--cert FILE --key FILE`` for a client certificate (mutual TLS); ``--token`` or, better, the
environment variable LSTM_CLIENT_TOKEN (a command line is visible to other users of the machine). Every flag has
its LSTM_CLIENT_* variable.
"""

from __future__ import annotations

import argparse
import os
import sys

from .client import Client
from .errors import LstmError
from .transport import TlsConfig


def chat(client: Client, args: argparse.Namespace) -> int:
    """Each line you type is one turn: it is sent followed by a newline, and the answer streams back
    until the stop string (a blank line by default) or max tokens."""
    defaults = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed, "stop": args.stop}
    with client.session(model=args.model, unknown_characters="replace", **defaults) as session:
        print(f"session {session.id} on {args.model}; an empty line or end of input quits", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if not line:
                break
            print(f"{args.model}> ", end="", flush=True)
            for chunk in session.generate(line + "\n", unknown_characters="replace"):
                print(chunk.text, end="", flush=True)
            print(flush=True)
    return 0


def classify(client: Client, args: argparse.Namespace) -> int:
    for text, result in zip(args.texts, client.classify(args.texts, model=args.model), strict=True):
        scores = "  ".join(f"{label} {p:.3f}" for label, p in result.probabilities.items())
        print(f"{result.label}\t{scores}\t{text}")
    return 0


def sessions(client: Client, args: argparse.Namespace) -> int:
    for info in client.list_sessions(args.model, page_size=args.page_size):
        busy = " busy" if info.busy else ""
        print(f"{info.session_id}\t{info.model}/{info.model_version}\t{info.tokens_seen} characters{busy}")
    return 0


def tls_of(args: argparse.Namespace) -> TlsConfig | bool:
    """TLS when any TLS flag is given; plaintext otherwise."""
    if args.ca or args.cert or args.key or args.server_name:
        return TlsConfig(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
    return bool(args.tls)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="lstm-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    commands = parser.add_subparsers(dest="command", required=True)
    chat_parser = commands.add_parser("chat", help="interactive chat with the language model")
    chat_parser.add_argument("--model", default="charlm")
    chat_parser.add_argument("--temperature", type=float, default=0.8)
    chat_parser.add_argument("--max-tokens", type=int, default=300)
    chat_parser.add_argument("--seed", type=int)
    chat_parser.add_argument("--stop", default="\n\n", help="end of an answer (default: a blank line)")
    classify_parser = commands.add_parser("classify", help="label each text")
    classify_parser.add_argument("texts", nargs="+")
    classify_parser.add_argument("--model", default="sentiment")
    sessions_parser = commands.add_parser("sessions", help="list your sessions")
    sessions_parser.add_argument("--model", default="", help="only this model's")
    sessions_parser.add_argument("--page-size", type=int, default=0, help="sessions per call (default: the server's)")
    args = parser.parse_args(argv)
    try:
        tls = tls_of(args)
    except ValueError as error:
        parser.error(str(error))
    run = {"chat": chat, "classify": classify, "sessions": sessions}[args.command]
    try:
        with Client(args.server, token=args.token, tls=tls) as client:
            return run(client, args)
    except (LstmError, OSError, ValueError) as error:
        print(f"lstm-client: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
