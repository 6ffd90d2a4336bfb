"""The shaped uplink paces real bytes: what the edge measures is what the link's own model
says it costs (RTT/2 + bytes·8/bandwidth), never less, and not much more.

The timed path is the product's: progvlm.net.transport.CloudLink sending through
progvlm.net.link.paced_chunks / paced_segments to a real cloud backend on loopback."""
import io
import math

import pytest
from PIL import Image

from progvlm.toyworld.examples import load_examples
from progvlm.net.link import LinkError, LinkProfile, paced_chunks
from progvlm.net.transport import CloudLink

Q = "describe the scene ."
REPEATS = 3  # the pacer is never early; a busy host makes single runs late, rarely all three
# Each modelled time is ≥ 200 ms, so that 10 % of it (the allowed lateness) is well above
# the few ms a busy host adds to the last chunk's release.
SLACK = 0.10


@pytest.fixture(scope="module")
def link_to_cloud(running_cloud):
    link = CloudLink(running_cloud.url, running_cloud.token)
    link.info()  # opens the kept-alive connection: no timed exchange pays the TCP handshake
    yield link
    link.close()


@pytest.fixture(scope="module")
def frame():
    return Image.open(load_examples()[1]["path"]).convert("RGB")


def uplink_model_ms(profile: LinkProfile, nbytes: int) -> float:
    return (profile.rtt_ms / 2000 + profile.serialisation_s(nbytes)) * 1e3


def assert_paced(uplinks_ms: list[float], model_ms: float):
    assert min(uplinks_ms) >= model_ms - 0.01, ("earlier than the link allows", uplinks_ms, model_ms)
    assert min(uplinks_ms) <= model_ms * (1 + SLACK), ("later than the link", uplinks_ms, model_ms)


@pytest.mark.parametrize("bandwidth_mbps, rtt_ms", [(1.0, 0), (2.0, 100)])
def test_a_frame_sent_to_the_cloud_takes_the_links_time(link_to_cloud, frame, bandwidth_mbps, rtt_ms):
    buf = io.BytesIO()
    frame.save(buf, "JPEG", quality=75)  # ≈ 38 kB: ≈ 300 ms at 1 Mbps
    jpeg = buf.getvalue()
    profile = LinkProfile(bandwidth_mbps, rtt_ms)
    exchanges = [link_to_cloud.full(jpeg, Q, profile) for _ in range(REPEATS)]
    assert all(ex.reply["answer"] and ex.reply["received_bytes"] == len(jpeg) for ex in exchanges)
    assert_paced([ex.uplink_ms for ex in exchanges], uplink_model_ms(profile, len(jpeg)))
    for ex in exchanges:  # the reply travels the same link back
        assert ex.downlink_ms >= rtt_ms / 2 and ex.wall_ms >= ex.uplink_ms + ex.downlink_ms


@pytest.mark.parametrize("refine", [False, True])
def test_a_bitstream_streamed_layer_by_layer_takes_the_links_time(link_to_cloud, split, frame, refine):
    data = split.pack(split.edge(frame))  # ≈ 120 bytes: ≈ 95 ms at the slowest link allowed
    profile = LinkProfile.checked(0.01, 250)
    exchanges = [link_to_cloud.progressive(data, Q, profile, refine=refine) for _ in range(REPEATS)]
    assert all(ex.reply["layers"] == split.num_layers and not ex.reply["partial"] for ex in exchanges)
    assert_paced([ex.uplink_ms for ex in exchanges], uplink_model_ms(profile, len(data)))


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
