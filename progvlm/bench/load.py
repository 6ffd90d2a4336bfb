"""The cloud under load, the project's one load-test client: N clients, each over its own
kept-open session (the service's WebSocket, as the edge agent uses it), sending progressive
requests back to back over loopback (no shaping); failures counted, p50 and p95 latency."""
from __future__ import annotations

import threading
import time

import numpy as np

from .settings import CONCURRENCY


def cloud_load(split, images, k_star: int, seconds: float, log, ray: bool) -> list[dict]:
    """The load test against the batching cloud (`serve-cloud --batching`) and, with `ray` and
    Ray Serve installed, against `serve-cloud-ray` (one replica, @serve.batch)."""
    import importlib.util
    from ..serve.children import ChildService, cloud_service, free_port, new_token
    with cloud_service(vlm="bundled", batching=True) as cloud:
        rows = load_test(split, cloud.url, cloud.token, images, k_star, seconds, log,
                         "one process, batched")
    if ray and importlib.util.find_spec("ray") is not None:
        port, token = free_port(), new_token()
        service = ChildService("cloud on Ray Serve", ["-m", "progvlm", "serve-cloud-ray", "--port", str(port)],
                               f"http://127.0.0.1:{port}", {"PROGVLM_CLOUD_TOKEN": token}, token)
        log("load: starting Ray Serve (a local Ray instance, one replica)")
        try:
            service.start(timeout_s=300)
            rows += load_test(split, service.url, token, images, k_star, seconds, log,
                              "Ray Serve, 1 replica, @serve.batch")
        finally:
            service.stop()
    return rows


def load_test(split, cloud_url: str, cloud_token: str | None, images: list[str], k_star: int,
              seconds: float, log, backend: str = "one process, one request at a time") -> list[dict]:
    """N clients, each sending progressive requests back to back over loopback (no shaping),
    each over its own kept-open session."""
    from ..images import load_image
    from ..net.link import LinkProfile
    from ..net.transport import CloudLink
    streams = [split.pack(split.edge(load_image(p), k_star)) for p in images]
    fast = LinkProfile(10_000.0, 0.0)
    rows = []
    for n in CONCURRENCY:
        log(f"load ({backend}): {n} concurrent clients for {seconds:.0f} s")
        latencies, failures = [], []
        stop = time.perf_counter() + seconds

        def client(i):
            link = CloudLink(cloud_url, cloud_token)
            j = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    link.progressive(streams[(i + j) % len(streams)], "describe the scene .", fast)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                except Exception as e:  # counted, and the figure says so
                    failures.append(repr(e))
                j += 1
            link.close()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rows.append({"backend": backend, "clients": n, "requests": len(latencies), "failed": len(failures),
                     "throughput_rps": len(latencies) / wall,
                     "p50_ms": float(np.percentile(latencies, 50)) if latencies else float("nan"),
                     "p95_ms": float(np.percentile(latencies, 95)) if latencies else float("nan")})
    return rows
