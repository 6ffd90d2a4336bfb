"""The shaped link paces real bytes: measured time ≈ bytes·8/bandwidth + RTT."""
import math
import socket
import threading

import pytest

from progvlm.link import LinkError, LinkProfile, paced_chunks, receive_one, send_over_tcp


def _receiver():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    got = {}
    thread = threading.Thread(target=lambda: got.setdefault("data", receive_one(server)), daemon=True)
    thread.start()
    return server, thread, got


@pytest.mark.parametrize("nbytes,rtt_ms", [(10_000, 0), (10_000, 40), (50_000, 20)])
def test_measured_transfer_matches_the_link_within_10_percent(nbytes, rtt_ms):
    profile = LinkProfile(bandwidth_mbps=1.0, rtt_ms=rtt_ms)
    payload = bytes(range(256)) * (nbytes // 256) + b"x" * (nbytes % 256)
    expected = nbytes * 8 / 1e6 + rtt_ms / 1000
    times = []
    for _ in range(3):  # the pacer is never early; a busy host makes a single run late
        server, thread, got = _receiver()
        with server:
            times.append(send_over_tcp(payload, server.getsockname(), profile))
            thread.join(5)
        assert got["data"] == payload
    assert min(times) >= 0.98 * expected, (times, expected)
    assert min(times) <= 1.10 * expected, (times, expected)


def test_pacing_releases_chunks_on_schedule_with_a_fake_clock():
    now = [0.0]
    released = []
    profile = LinkProfile(bandwidth_mbps=8e-6, chunk_bytes=1)  # 8 bit/s: 1 byte per second
    for chunk in paced_chunks(b"abc", profile, clock=lambda: now[0],
                              sleep=lambda s: now.__setitem__(0, now[0] + s)):
        released.append((chunk, now[0]))
    assert released == [(b"a", 1.0), (b"b", 2.0), (b"c", 3.0)]


@pytest.mark.parametrize("bw", [0, -1, math.nan, math.inf, "fast"])
def test_bad_bandwidth_is_refused(bw):
    with pytest.raises(LinkError, match="bandwidth must be a positive number"):
        LinkProfile(bandwidth_mbps=bw)


@pytest.mark.parametrize("rtt", [-5, math.nan])
def test_bad_rtt_is_refused(rtt):
    with pytest.raises(LinkError, match="RTT must be"):
        LinkProfile(bandwidth_mbps=1, rtt_ms=rtt)


def test_a_link_cut_mid_transfer_is_reported():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    errors = []

    def receiver():
        try:
            receive_one(server)
        except LinkError as e:
            errors.append(str(e))

    t = threading.Thread(target=receiver, daemon=True)
    t.start()
    with socket.create_connection(server.getsockname()) as s:
        s.sendall(b"\x00\x00\x10\x00" + b"y" * 100)  # announces 4096 bytes, sends 100
    t.join(5)
    server.close()
    assert errors and "link cut after 100 of 4096 bytes" in errors[0]
