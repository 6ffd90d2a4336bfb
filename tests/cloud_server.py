"""A cloud backend app served by uvicorn on loopback in a thread, for tests that need a real
socket (WebSocket clients from another library, disconnects, logging, timing)."""
import contextlib
import threading
import time

import uvicorn

from progvlm.serve.children import free_port


@contextlib.contextmanager
def serving(app, port: int | None = None, log_level: str = "info", **config):
    """Yield the base URL of `app` served on a free loopback port; stop it on exit. Logging
    goes through the root logger (log_config=None), so caplog sees uvicorn's records too."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port or free_port(),
                                           log_config=None, log_level=log_level, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)
