"""The kernel link (progvlm/net/kernel_link.py): the kernel shapes the rate and the delay is real.

Lower bounds only where timing is concerned (a shaped link cannot be faster than its rate and
delay allow); the upper bounds are loose sanity checks. Needs root, `ip` and `tc`."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from progvlm.net.kernel_link import die_with_parent, kernel_link, kernel_link_available

pytestmark = pytest.mark.slow

ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    c, _ = s.accept()
    while True:
        d = c.recv(65536)
        if not d: break
        if d.endswith(b"END"): c.sendall(b"ok")
    c.close()
"""


def _exchange(sock, payload: bytes) -> float:
    t0 = time.perf_counter()
    sock.sendall(payload + b"END")
    if sock.recv(10) != b"ok":  # the relay hangs up while nothing listens behind it yet
        raise ConnectionError("closed")
    return (time.perf_counter() - t0) * 1e3


def test_kernel_link_charges_rate_and_delay():
    ok, why = kernel_link_available()
    if not ok:
        pytest.skip(why)
    rtt_ms, payload = 20.0, b"y" * 25_000
    with kernel_link(1.0, rtt_ms) as link:
        server = subprocess.Popen(link.in_namespace([sys.executable, "-c", ECHO, str(link.inner_port)]),
                                  preexec_fn=die_with_parent)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock = socket.create_connection((link.cloud_ip, link.cloud_port), timeout=5)
                    _exchange(sock, b"x")  # the first exchange also pays the handshake's round trip
                    break
                except (ConnectionError, OSError):
                    assert time.monotonic() < deadline, "the echo server behind the link never answered"
                    time.sleep(0.1)
            small = min(_exchange(sock, b"x") for _ in range(3))
            sent_before = link.uplink_bytes()
            big = _exchange(sock, payload)
            wire = link.uplink_bytes() - sent_before
            link.set_rate(10.0)
            big_fast = _exchange(sock, payload)
            sock.close()
        finally:
            server.terminate()
            server.wait(5)
    serialisation_ms = len(payload) * 8 / 1e6 * 1e3  # 200 ms at 1 Mbit/s
    print(f"\n{link.describe()}: small {small:.1f} ms, 25 KB {big:.1f} ms at 1 Mbit/s, "
          f"{big_fast:.1f} ms at 10 Mbit/s; {wire} B through the uplink qdisc")
    assert rtt_ms - 1 <= small <= rtt_ms + 60
    assert wire >= len(payload)  # every byte went through the shaped device
    assert big >= rtt_ms + 0.9 * serialisation_ms
    assert rtt_ms + 0.09 * serialisation_ms <= big_fast < big / 2
