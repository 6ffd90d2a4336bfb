"""The services' in-process test client, as a local program calls them: `Host: 127.0.0.1`.

Starlette's TestClient names its server `testserver`, and the services answer only requests
that name them by address, localhost or a name they were started with
(progvlm.net.http_limits.TrustedHost: a DNS-rebinding page names its own domain)."""
from urllib.parse import urljoin

from fastapi.testclient import TestClient

BASE_URL = "http://127.0.0.1"


class LocalClient(TestClient):
    def __init__(self, app, **kwargs):
        super().__init__(app, base_url=kwargs.pop("base_url", BASE_URL), **kwargs)

    def websocket_connect(self, url: str, *args, **kwargs):
        return super().websocket_connect(urljoin(BASE_URL.replace("http", "ws", 1), url),
                                         *args, **kwargs)
