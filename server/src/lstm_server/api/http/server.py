"""The HTTP port, served by uvicorn in the server's own event loop beside gRPC.

The socket is bound when the server is built (a taken port fails the start in one line, as gRPC's does); uvicorn
serves it from ``start`` on, without signal handlers of its own (the server's handle SIGTERM and SIGINT), and
``stop`` drains it with gRPC: no new connection, running requests finish within the grace period, then the rest
are cancelled. Once no request runs, the connections left are aborted: a TLS close waits for the client's
close_notify, which an idle keep-alive client never sends, so uvicorn alone would hold the drain for the whole grace
period. TLS uses the gRPC port's certificate and key (and client CA: verified, see ``auth.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from ...config import ServerConfig

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (OSError if it cannot be bound)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """uvicorn on one bound socket; its tasks run on the event loop."""

    def __init__(self, app, config: ServerConfig, sock: socket.socket) -> None:
        self.socket = sock
        self.port = sock.getsockname()[1]
        tls = {}
        if config.tls_cert:
            tls = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
            if config.tls_client_ca:
                tls |= {"ssl_ca_certs": config.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        settings = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            **tls,
        )
        settings.load()
        self._server = uvicorn.Server(settings)
        self._server.lifespan = settings.lifespan_class(settings)
        self._main: asyncio.Task | None = None

    async def start(self) -> None:
        await self._server.startup(sockets=[self.socket])
        self._main = asyncio.get_running_loop().create_task(self._server.main_loop())

    async def stop(self, grace: float) -> None:
        """Stop accepting, let running requests finish within ``grace`` seconds (then cancel them), and close every
        connection as soon as no request runs."""
        self._server.should_exit = True
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        if self._server.started:
            self._server.config.timeout_graceful_shutdown = grace
            shutdown = asyncio.ensure_future(self._server.shutdown(sockets=[self.socket]))
            state = self._server.server_state  # uvicorn's: its connections and its running requests (tasks)
            while not shutdown.done():
                if not state.tasks:
                    for connection in list(state.connections):
                        connection.transport.abort()
                await asyncio.wait([shutdown], timeout=0.05)
            for connection in list(state.connections):  # past the grace period
                connection.transport.abort()
            await shutdown
        self.socket.close()
