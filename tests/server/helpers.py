"""Start a real pagoda server (uvicorn, the server's own ``PagodaServer``) on a free loopback port in a thread."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from pagoda.server.app import build_app
from pagoda.server.launcher import make_server


@contextmanager
def running_server(engine, served_model_name: str = "tiny", **app_kwargs):
    """Yields (base_url, app); on exit shuts the server down as SIGTERM would and joins its thread."""
    app = build_app(engine, served_model_name=served_model_name, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(app, "127.0.0.1", port, log_level="warning", shutdown_timeout=10.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"
