"""``lstm-client chat`` (interactive, streamed, one session across turns) and ``lstm-client classify TEXT...``."""

from __future__ import annotations

import argparse
import sys

from .client import Client
from .errors import LstmError


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstm-client", description=__doc__)
    parser.add_argument("--server", default="localhost:50051", help="host:port of the server or gateway")
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
    args = parser.parse_args(argv)
    try:
        with Client(args.server) as client:
            return chat(client, args) if args.command == "chat" else classify(client, args)
    except LstmError as error:
        print(f"lstm-client: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
