"""``lstm-server --models models --port 50051 ...``; ``lstm-server --help`` lists every option.

Anything that stops the server from starting (a bad option, a model that cannot be loaded, a port in use, an
unreadable key or certificate) ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import sys

from .app import StartupError, check_port_free, serve
from .config import ConfigError, load_config
from .logs import configure_logging
from .runtime.model_repository import ModelRepositoryError
from .tracing import setup_tracing


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT; 2 if it cannot start (the reason is one line on stderr)."""
    try:
        config = load_config(argv)
        check_port_free(config.host, config.port)
        check_port_free(config.host, config.http_port, "--http-port")
        configure_logging(config.log_level, config.replica_name)
        setup_tracing(config)  # once per process, like the logs
        # the model thread needs the GIL back after every model call, while the event loop holds it for gRPC: with
        # Python's 5 ms it could wait that long each time (measured: bench/RESULTS.md)
        sys.setswitchinterval(config.gil_switch_interval_ms / 1000)
        asyncio.run(serve(config))
    except (ConfigError, ModelRepositoryError, StartupError) as error:
        print(f"lstm-server: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
