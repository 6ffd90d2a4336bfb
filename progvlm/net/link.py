"""The shaped uplink: real bytes, paced to a bandwidth, with a round-trip delay.

The edge sends through `paced_chunks`, which releases each chunk only when a link of the given
bandwidth would have finished serialising everything before it; the round trip is paid as
half before the first byte (the request travelling) and half after the last (the reply). The
time reported is the measured wall time of really sending those bytes, never a formula.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator


class LinkError(ValueError):
    pass


# The ranges a caller may ask for (LinkProfile.checked; the edge agent applies them to every
# request): wide enough for any real uplink, narrow enough that no value overflows a timer or
# keeps a thread pacing or sleeping for long.
MIN_BANDWIDTH_MBPS = 0.01  # 10 kbit/s
MAX_BANDWIDTH_MBPS = 10_000.0  # 10 Gbit/s
MAX_RTT_MS = 10_000.0  # 10 s; a geostationary satellite hop is ~0.6 s
# a JSON answer on the downlink: what a request's time on the link counts besides its payload
# (the edge's link-time bound and auto's and adaptive's predictions, the bench's cost profile)
REPLY_BYTES = 250


@dataclass(frozen=True)
class LinkProfile:
    """An uplink's bandwidth (Mbps) and round-trip time (ms).

    Ranges a caller may ask for (`LinkProfile.checked`, which the edge agent applies to every
    request, whatever its mode): bandwidth 0.01–10000 Mbps, RTT 0–10000 ms. The constructor
    itself only refuses values that are no link at all (not a number, infinite, a bandwidth
    ≤ 0, a negative RTT), so that pacing can be simulated at any rate with a fake clock.
    """
    bandwidth_mbps: float
    rtt_ms: float = 0.0
    chunk_bytes: int = 1000  # ≈ one Ethernet payload: pacing granularity
    # False: a real network carries the bytes (e.g. progvlm.net.kernel_link's kernel link), so nothing
    # is paced or slept here; bandwidth and RTT then only describe that network, to split the
    # measured time into the uplink and downlink stages
    emulated: bool = True

    def __post_init__(self):
        bw, rtt = self.bandwidth_mbps, self.rtt_ms
        if not _is_number(bw) or not math.isfinite(bw) or bw <= 0:
            raise LinkError(f"bandwidth must be a positive number of Mbps "
                            f"({_bandwidth_range()}), got {bw!r}")
        if not _is_number(rtt) or not math.isfinite(rtt) or rtt < 0:
            raise LinkError(f"RTT must be a non-negative number of ms ({_rtt_range()}), got {rtt!r}")
        if self.chunk_bytes < 1:
            raise LinkError("chunk_bytes must be at least 1")

    @classmethod
    def checked(cls, bandwidth_mbps: float, rtt_ms: float = 0.0, emulated: bool = True) -> "LinkProfile":
        """A profile within the documented ranges, or LinkError saying the range."""
        link = cls(bandwidth_mbps, rtt_ms, emulated=emulated)
        if not MIN_BANDWIDTH_MBPS <= link.bandwidth_mbps <= MAX_BANDWIDTH_MBPS:
            raise LinkError(f"bandwidth must be {_bandwidth_range()}, got {bandwidth_mbps!r}")
        if not 0 <= link.rtt_ms <= MAX_RTT_MS:
            raise LinkError(f"RTT must be {_rtt_range()}, got {rtt_ms!r}")
        return link

    def link_time_s(self, nbytes: int) -> float:
        """The least time `nbytes` spend on this link, round trip included."""
        return self.rtt_ms / 1000 + self.serialisation_s(nbytes)

    def request_time_s(self, payload_bytes: int) -> float:
        """The least time a request spends on this link: the round trip, its payload and a
        reply (REPLY_BYTES)."""
        return self.link_time_s(payload_bytes + REPLY_BYTES)

    def serialisation_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.bandwidth_mbps * 1e6)

    def propagate(self, sleep=time.sleep):
        """One way of the round trip, emulated (a real network has already paid it)."""
        if self.emulated:
            sleep(self.rtt_ms / 2000)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bandwidth_range() -> str:
    return f"{MIN_BANDWIDTH_MBPS:g}–{MAX_BANDWIDTH_MBPS:g} Mbps"


def _rtt_range() -> str:
    return f"0–{MAX_RTT_MS:g} ms"


def paced_chunks(data: bytes, profile: LinkProfile, clock=time.perf_counter,
                 sleep=time.sleep) -> Iterator[bytes]:
    """Yield `data` in chunks, each no earlier than the link could have carried it."""
    return paced_segments([data], profile, clock, sleep)


def paced_segments(segments: list[bytes], profile: LinkProfile, clock=time.perf_counter,
                   sleep=time.sleep) -> Iterator[bytes]:
    """As paced_chunks over the segments joined, but no chunk spans two segments: a receiver
    sees each segment (e.g. one progressive layer) complete as soon as the link delivers it."""
    start = clock()
    sent = 0
    for data in segments:
        for i in range(0, len(data), profile.chunk_bytes):
            chunk = data[i:i + profile.chunk_bytes]
            due = start + profile.serialisation_s(sent + len(chunk))
            wait = due - clock()
            if wait > 0 and profile.emulated:
                sleep(wait)
            sent += len(chunk)
            yield chunk
