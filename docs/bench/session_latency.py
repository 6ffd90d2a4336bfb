"""Per-request wall time of progressive k=1 at RTT 20 ms / 1 Mbps: a socket per request (the
transport before sessions, and today's with keep_open=False) against the kept-open session.

Two ways to get the RTT: (A) a real TCP proxy on loopback that holds every byte RTT/2 in each
direction (handshakes pay real round trips; the pacer adds bandwidth only), and (B) the
transport's own emulation (RTT/2 sleeps, HANDSHAKE_RTTS round trips per new socket).

    python docs/bench/session_latency.py [--requests 20] [--old-transport path/to/transport.py]

--old-transport: a copy of progvlm/net/transport.py from before sessions (git show
61b0026:progvlm/net/transport.py > /tmp/old_transport.py), measured the same way.
"""
import argparse
import asyncio
import importlib.util
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from PIL import Image  # noqa: E402

from cloud_server import serving  # noqa: E402
from progvlm.serve.cloud import create_app  # noqa: E402
from progvlm.toyworld.examples import load_examples  # noqa: E402
from progvlm.net.link import LinkProfile  # noqa: E402
from progvlm.serve.children import free_port  # noqa: E402
from progvlm.split import load_split  # noqa: E402
from progvlm.net.transport import CloudLink  # noqa: E402

RTT_MS, MBPS, Q = 20.0, 1.0, "describe the scene ."


def delay_proxy(target_port: int, one_way_s: float) -> int:
    """A loopback TCP proxy that delivers every byte one_way_s after it arrived, each way."""
    port = free_port()

    async def pipe(reader, writer):
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                writer.write(data)
                await writer.drain()
            writer.close()
        task = asyncio.create_task(deliver())
        while data := await reader.read(65536):
            queue.put_nowait((time.perf_counter() + one_way_s, data))
        queue.put_nowait(None)
        await task

    async def handle(client_r, client_w):
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w), return_exceptions=True)

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        started.set()
        async with server:
            await server.serve_forever()
    started = threading.Event()
    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    started.wait(5)
    return port


def load_old(path: str):
    spec = importlib.util.spec_from_file_location("progvlm.transport_before_sessions", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module.CloudLink


def median_ms(make_link, data, link, n) -> tuple[float, float]:
    client = make_link()
    walls, connects = [], []
    try:
        for _ in range(n + 1):
            t0 = time.perf_counter()
            ex = client.progressive(data, Q, link, refine=False)
            walls.append((time.perf_counter() - t0) * 1e3)
            connects.append(getattr(ex, "connect_ms", float("nan")))
    finally:
        client.close()
    return statistics.median(walls[1:]), statistics.median(connects[1:])  # the first warms up


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--old-transport", default=None)
    a = p.parse_args()
    split = load_split()
    data = split.pack(split.edge(Image.open(load_examples()[0]["path"]), 1))
    app = create_app(split)
    app.state.model.warm_up()
    with serving(app, log_level="warning") as url:
        port = int(url.rsplit(":", 1)[1])
        proxied = f"http://127.0.0.1:{delay_proxy(port, RTT_MS / 2000)}"
        clients = {"new, session (kept open)": lambda u: CloudLink(u),
                   "new, keep_open=False": lambda u: CloudLink(u, keep_open=False)}
        if a.old_transport:
            clients = {"old (socket per request)": load_old(a.old_transport)} | clients
        print(f"progressive k=1 ({len(data)} bytes), {MBPS:g} Mbps, RTT {RTT_MS:g} ms, median of "
              f"{a.requests} requests (ms)")
        for setup, base, link in (("A real-delay proxy", proxied, LinkProfile(MBPS, 0.0)),
                                  ("B emulated RTT", url, LinkProfile(MBPS, RTT_MS))):
            for name, make in clients.items():
                wall, connect = median_ms(lambda: make(base), data, link, a.requests)
                print(f"  {setup:<20} {name:<26} wall {wall:7.1f}   connect {connect:6.1f}")


if __name__ == "__main__":
    main()
