"""``lstm-server --models models --port 50051 ...``; ``lstm-server --help`` lists every option."""

from __future__ import annotations

import asyncio
import sys

from .app import serve
from .config import load_config
from .logs import configure_logging
from .model_repository import ModelRepositoryError


def main(argv: list[str] | None = None) -> int:
    config = load_config(argv)
    configure_logging(config.log_level, config.replica_name)
    try:
        asyncio.run(serve(config))
    except ModelRepositoryError as error:
        print(f"lstm-server: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
