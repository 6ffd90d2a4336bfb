"""A real network between the edge and the cloud, made by the kernel.

`kernel_link(rate_mbit, rtt_ms)` puts the cloud in its own network namespace, joined to this
host by a veth pair. The kernel limits both directions to the rate (tc `tbf` on each veth end),
so the bytes, TCP's handshakes, windows and retransmissions are real. The propagation delay
(RTT/2 each way) is added by tc `netem` where the kernel has it; where it does not (this
project's CI machine lacks sch_netem), by a delay relay in the cloud's namespace, in front of
the cloud's port: it holds every chunk RTT/2 in each direction, in order, and holds a new
connection's first bytes one extra RTT, the TCP handshake the relay's own accept skipped.
`KernelLink.delay_by` says which one is in use; the benchmark reports it.

Needs Linux, root, `ip` and `tc` (iproute2). `kernel_link_available()` says why not otherwise.

    with kernel_link(1.0, 20.0) as link:
        cloud = subprocess.Popen(link.in_namespace([python, "-m", "progvlm", "serve-cloud",
                                 "--host", link.listen_host, "--port", str(link.inner_port)]))
        ... the edge on this host talks to link.cloud_url ...

The relay is also a command: `python -m progvlm.net.kernel_link relay LISTEN_HOST:PORT TARGET_HOST:PORT
DELAY_MS`.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

CLOUD_PORT = 8080  # where the edge connects, inside the cloud's own namespace
INNER_PORT = 8081  # where the cloud listens behind the relay (loopback of the namespace)
BURST_BYTES = 1600  # tbf sends this much at line rate before it starts shaping
QUEUE_LATENCY_MS = 400  # tbf's queue: beyond this much waiting, packets are dropped (TCP resends)


class KernelLinkError(RuntimeError):
    """The machine cannot make the kernel link; str(e) says why."""


def run_quiet(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def run_checked(cmd: list[str]) -> str:
    r = run_quiet(cmd)
    if r.returncode:
        raise KernelLinkError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def kernel_link_available() -> tuple[bool, str]:
    """(True, "") when this process can make namespaces and shape a veth; else (False, why)."""
    if not sys.platform.startswith("linux"):
        return False, "network namespaces are Linux only"
    if os.geteuid() != 0:
        return False, "making network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) not found"
    name = f"pvprobe{os.getpid()}"
    r = run_quiet(["ip", "netns", "add", name])
    if r.returncode:
        return False, f"`ip netns add` failed: {r.stderr.strip()}"
    run_quiet(["ip", "netns", "del", name])
    return True, ""


def _qdisc_known(ns: str, dev: str, kind: list[str]) -> bool:
    ok = run_quiet(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *kind]).returncode == 0
    if ok:
        run_quiet(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"])
    return ok


def _shaper(rate_mbit: float, rtt_ms: float, netem: bool) -> list[str]:
    """One veth end's qdisc: netem (rate and one-way delay RTT/2) or tbf (rate only)."""
    rate = f"{rate_mbit:g}mbit"
    if netem:
        return ["netem", "delay", f"{rtt_ms / 2:g}ms", "rate", rate]
    return ["tbf", "rate", rate, "burst", str(BURST_BYTES), "latency", f"{QUEUE_LATENCY_MS}ms"]


def die_with_parent():
    """For Popen(preexec_fn=…): the child ends even when its parent is killed outright."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class KernelLink:
    namespace: str  # the cloud's network namespace
    cloud_ip: str  # its address on the veth
    host_ip: str  # this host's end of the veth
    host_if: str  # this host's veth device (its qdisc shapes the uplink)
    ns_if: str  # the cloud's veth device (its qdisc shapes the downlink)
    rate_mbit: float
    rtt_ms: float
    delay_by: str  # "netem" (kernel) or "relay" (the delay relay; see the module doc)
    inner_port: int  # where the cloud must listen: 127.0.0.1 inside the namespace
    cloud_port: int = CLOUD_PORT

    @property
    def listen_host(self) -> str:
        """Where the cloud binds inside the namespace: behind the relay, its loopback."""
        return self.cloud_ip if self.delay_by == "netem" else "127.0.0.1"

    @property
    def cloud_url(self) -> str:
        return f"http://{self.cloud_ip}:{self.cloud_port}"

    def in_namespace(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *cmd]

    def uplink_bytes(self) -> int:
        """Bytes the kernel has sent towards the cloud through the shaped uplink so far."""
        import json
        stats = json.loads(run_checked(["tc", "-s", "-j", "qdisc", "show", "dev", self.host_if]))
        return sum(q["bytes"] for q in stats if q.get("root"))

    def set_rate(self, rate_mbit: float):
        """Re-shape both directions to another rate (the delay is unchanged)."""
        for prefix, dev in (([], self.host_if), (["ip", "netns", "exec", self.namespace], self.ns_if)):
            run_checked([*prefix, "tc", "qdisc", "change", "dev", dev, "root", *_shaper(rate_mbit, self.rtt_ms,
                                                                             self.delay_by == "netem")])
        self.rate_mbit = rate_mbit

    def describe(self) -> str:
        delay = ("tc netem" if self.delay_by == "netem" else
                 "a delay relay in the cloud's namespace (this kernel has no netem)")
        return (f"kernel link: veth between network namespaces, tc tbf {self.rate_mbit:g} Mbit/s "
                f"each way, RTT {self.rtt_ms:g} ms added by {delay}")


@contextmanager
def kernel_link(rate_mbit: float, rtt_ms: float, prefer_netem: bool = True):
    """A shaped veth between this host and a fresh namespace for the cloud (see module doc).
    Everything it made is removed on exit, however the block ends."""
    ok, why = kernel_link_available()
    if not ok:
        raise KernelLinkError(why)
    pid = os.getpid()
    x = pid % 250 + 1
    ns, host_if, ns_if = f"pvkl{pid}", f"pvh{pid}", f"pvn{pid}"
    host_ip, cloud_ip = f"10.232.{x}.1", f"10.232.{x}.2"
    relay = None
    made_ns = False
    try:
        run_checked(["ip", "netns", "add", ns])
        made_ns = True
        run_checked(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns])
        run_checked(["ip", "addr", "add", f"{host_ip}/24", "dev", host_if])
        run_checked(["ip", "link", "set", host_if, "up"])
        run_checked(["ip", "-n", ns, "addr", "add", f"{cloud_ip}/24", "dev", ns_if])
        run_checked(["ip", "-n", ns, "link", "set", "lo", "up"])
        run_checked(["ip", "-n", ns, "link", "set", ns_if, "up"])
        use_netem = prefer_netem and _qdisc_known(ns, ns_if, _shaper(rate_mbit, rtt_ms, True))
        shaper = _shaper(rate_mbit, rtt_ms, use_netem)
        run_checked(["tc", "qdisc", "add", "dev", host_if, "root", *shaper])
        run_checked(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_if, "root", *shaper])
        if use_netem:
            inner_port = CLOUD_PORT
        else:
            inner_port = INNER_PORT
            relay = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "progvlm.net.kernel_link", "relay",
                 f"{cloud_ip}:{CLOUD_PORT}", f"127.0.0.1:{inner_port}", f"{rtt_ms / 2:g}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                preexec_fn=die_with_parent)
            _wait_listening(ns, cloud_ip, CLOUD_PORT, relay)
        yield KernelLink(ns, cloud_ip, host_ip, host_if, ns_if, rate_mbit, rtt_ms,
                         "netem" if use_netem else "relay", inner_port)
    finally:
        if relay is not None and relay.poll() is None:
            relay.terminate()
            try:
                relay.wait(5)
            except subprocess.TimeoutExpired:
                relay.kill()
        if made_ns:  # takes the veth pair and its qdiscs with it
            run_quiet(["ip", "netns", "del", ns])


def _wait_listening(ns: str, ip: str, port: int, proc: subprocess.Popen, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KernelLinkError(f"the delay relay exited ({proc.returncode}): {proc.stderr.read()[-500:]}")
        if f"{ip}:{port}" in run_quiet(["ip", "netns", "exec", ns, "ss", "-Hltn"]).stdout:
            return
        time.sleep(0.05)
    raise KernelLinkError(f"the delay relay did not listen on {ip}:{port} within {timeout_s:g} s")


# ---- the delay relay ------------------------------------------------------------------------
async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                first_extra_s: float = 0.0):
    """Copy reader → writer, each chunk released `delay_s` after it arrived (order kept)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def receive():
        extra = first_extra_s
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + delay_s + extra, data))
            extra = 0.0
            if not data:
                return

    receiver = asyncio.create_task(receive())
    try:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        receiver.cancel()


async def _relay(listen: tuple[str, int], target: tuple[str, int], delay_s: float):
    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        # the handshake a real path would have charged: one round trip before the first bytes
        up = asyncio.create_task(_pipe(client_r, server_w, delay_s, first_extra_s=2 * delay_s))
        down = asyncio.create_task(_pipe(server_r, client_w, delay_s))
        await asyncio.wait([up, down], return_when=asyncio.ALL_COMPLETED)
        for w in (client_w, server_w):
            w.close()

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m progvlm.net.kernel_link")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="a TCP relay that delays each direction by DELAY_MS")
    r.add_argument("listen")
    r.add_argument("target")
    r.add_argument("delay_ms", type=float)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(_relay(_address(a.listen), _address(a.target), a.delay_ms / 1e3))


if __name__ == "__main__":
    main()
