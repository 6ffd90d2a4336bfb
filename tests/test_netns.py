"""The edge and the cloud in two network namespaces, joined by a veth pair shaped by `tc`.

The application's pacer is set to 10 Gbps (effectively off), so only the kernel's token bucket
(1 Mbit/s on both veth ends) limits the bytes: the exchange must then take at least as long as
the real interface needs to carry the payload. Needs root, `ip` and `tc`; skipped otherwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from progvlm.net.kernel_link import die_with_parent, run_checked, run_quiet
from progvlm.net.kernel_link import kernel_link_available as _netns_available

# two namespaces, a shaped veth and two services started in them: CI runs it with `-m slow`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RATE_MBIT = 1
BURST_BYTES = 1600  # tbf lets this much through at line rate before it starts shaping
TBF = ["tbf", "rate", f"{RATE_MBIT}mbit", "burst", str(BURST_BYTES), "latency", "400ms"]
PORT = 8080  # inside the cloud's own namespace: nothing else listens there
QUESTION = "how many objects are there ?"
# the cloud listens beyond loopback (its veth address), which it does only with a token
TOKEN_ENV = {**os.environ, "PROGVLM_CLOUD_TOKEN": "netns-test-token"}
HEALTH_PROBE = """
import sys, time, httpx
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
sys.exit(f"no answer from {url}/healthz")
"""


@pytest.fixture(scope="module")
def link():
    ok, why = _netns_available()
    if not ok:
        print(f"skipping the netns test: {why}")
        pytest.skip(why)
    pid = os.getpid()
    x = pid % 250 + 1
    cloud_ns, edge_ns = f"pvcloud{pid}", f"pvedge{pid}"
    cloud_if, edge_if = f"pvc{pid}", f"pve{pid}"  # created inside the namespaces: no clash
    made = []
    try:
        for ns in (cloud_ns, edge_ns):
            run_checked(["ip", "netns", "add", ns])
            made.append(ns)
        run_checked(["ip", "link", "add", cloud_if, "netns", cloud_ns, "type", "veth",
             "peer", "name", edge_if, "netns", edge_ns])
        for ns, dev, ip in ((cloud_ns, cloud_if, f"10.231.{x}.1"), (edge_ns, edge_if, f"10.231.{x}.2")):
            run_checked(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            run_checked(["ip", "-n", ns, "link", "set", "lo", "up"])
            run_checked(["ip", "-n", ns, "link", "set", dev, "up"])
            run_checked(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *TBF])
        yield {"cloud_ns": cloud_ns, "edge_ns": edge_ns, "cloud_ip": f"10.231.{x}.1",
               "edge_if": edge_if}
    finally:
        for ns in made:  # takes the veth pair and its qdiscs with it
            run_quiet(["ip", "netns", "del", ns])


@pytest.fixture(scope="module")
def cloud(link):
    url = f"http://{link['cloud_ip']}:{PORT}"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(["ip", "netns", "exec", link["cloud_ns"], sys.executable, "-m", "progvlm",
                             "serve-cloud", "--host", link["cloud_ip"], "--port", str(PORT)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env=TOKEN_ENV,
                            preexec_fn=die_with_parent)
    probe = None
    try:
        # probed from the edge's namespace: the route through the veth works too
        probe = subprocess.Popen(["ip", "netns", "exec", link["edge_ns"], sys.executable, "-c",
                                  HEALTH_PROBE, url, "60"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
        while probe.poll() is None and proc.poll() is None:
            time.sleep(0.1)
        if probe.poll() is None:
            probe.kill()
        if probe.wait() != 0:
            log.seek(0)
            pytest.fail(f"the cloud backend at {url} did not come up (exit {proc.poll()}); probe: "
                        f"{probe.stderr.read().strip()}\ncloud stderr:\n"
                        f"{log.read().decode(errors='replace')[-3000:]}")
        yield url
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.wait()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _edge_qdisc_bytes(link) -> int:
    stats = json.loads(run_checked(["ip", "netns", "exec", link["edge_ns"], "tc", "-s", "-j", "qdisc", "show",
                            "dev", link["edge_if"]]))
    return sum(q["bytes"] for q in stats if q.get("root"))


def _image() -> str:
    from progvlm.toyworld.examples import load_examples
    # the busiest frame (largest PNG) gives the largest JPEG, so the link time dominates the noise
    return max((item["path"] for item in load_examples()), key=lambda p: Path(p).stat().st_size)


def _ask(link, url: str, *args: str) -> dict:
    cmd = ["ip", "netns", "exec", link["edge_ns"], sys.executable, "-m", "edge_agent", "ask",
           "--image", _image(), "--question", QUESTION, "--bandwidth-mbps", "10000", "--rtt-ms", "0",
           "--cloud-url", url, *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=TOKEN_ENV)
    assert r.returncode == 0, f"edge ask {args} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def full_cloud(link, cloud):
    before = _edge_qdisc_bytes(link)
    record = _ask(link, cloud, "--mode", "full-cloud")
    return record, _edge_qdisc_bytes(link) - before


def _serialisation_ms(nbytes: int) -> float:
    return nbytes * 8 / (RATE_MBIT * 1e6) * 1e3


def test_full_cloud_and_progressive_through_a_shaped_veth(link, cloud, full_cloud):
    record, wire_bytes = full_cloud
    stages = record["stage_ms"]
    assert isinstance(record["answer"], str) and record["answer"].strip()
    payload = record["payload_bytes"]
    assert payload > 3000
    # everything the edge sent for this request went through the shaped veth
    assert wire_bytes >= payload
    floor_ms = _serialisation_ms(payload)
    # the uplink stage counts the wire time: the kernel takes the bytes at once, so it is the
    # cloud's first-to-last-byte receive time that carries the shaping. tbf's burst leaves at
    # line rate (and carries the HTTP headers, before the body's first byte), so the shaped
    # part is at least the payload less the burst; unshaped, the uplink would be ~1 ms.
    shaped_ms = _serialisation_ms(payload - BURST_BYTES)
    print(f"\nfull-cloud through tc {RATE_MBIT} Mbit/s: payload {payload} B "
          f"(serialisation {floor_ms:.1f} ms, {shaped_ms:.1f} ms past the burst), {wire_bytes} B "
          f"through the edge qdisc; uplink {stages['uplink']:.1f} ms, overhead "
          f"{stages['overhead']:.1f} ms; wall {record['wall_ms']:.1f} ms; answer {record['answer']!r}")
    assert 0.9 * shaped_ms <= stages["uplink"] <= 3 * floor_ms + 100, stages

    progressive = _ask(link, cloud, "--mode", "progressive", "--k", "2")
    print(f"progressive k=2: payload {progressive['payload_bytes']} B, layers_used "
          f"{progressive['layers_used']}, uplink {progressive['stage_ms']['uplink']:.1f} ms, "
          f"answer {progressive['answer']!r}")
    assert isinstance(progressive["answer"], str) and progressive["answer"].strip()
    assert progressive["layers_used"] == 2
