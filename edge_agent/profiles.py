"""Device profiles: where the edge's compute times come from.

    host            measured on this machine with one thread, as is
    imx95-emulated  measured on this machine with one thread, then multiplied by a compute-speed
                    factor: PROJECTED, and labelled so in every record and in the UI

Both run the device's compute on one thread: in the demo, the tests and the benchmark the edge
and the cloud share this host's cores, and a second thread per process only makes each steal
the other's core (measured: the cloud's generation took 27 ms right after the edge's compute
with two threads each, 9 ms with one each).

The factor (7.0) is an assumption, not a measurement: the i.MX95's application cores are
Cortex-A55s (in-order, up to 1.8 GHz), and public single-core benchmark scores of A55 devices
sit roughly 6–8× below those of a recent x86 server core like this host's. Replace it with a
board measurement (`python -m edge_agent ask --profile host` run on the board) when one exists;
PROGVLM_IMX95_FACTOR overrides it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    compute_factor: float  # multiplies measured compute times; 1.0 = measured as is
    threads: int | None  # intra-op threads for the runtime; None = the runtime's default
    source: str

    @property
    def projected(self) -> bool:
        return self.compute_factor != 1.0


def _imx95_factor() -> float:
    raw = os.environ.get("PROGVLM_IMX95_FACTOR", "7.0")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"PROGVLM_IMX95_FACTOR must be a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"PROGVLM_IMX95_FACTOR must be positive, got {raw!r}")
    return value


def get_profile(name: str) -> DeviceProfile:
    if name == "host":
        return DeviceProfile("host", 1.0, 1, "measured on this host (1 thread)")
    if name == "imx95-emulated":
        factor = _imx95_factor()
        return DeviceProfile("imx95-emulated", factor, 1,
                             f"projected: host-measured (1 thread) × {factor:g}, an assumed "
                             "Cortex-A55 vs x86 single-core speed factor, not a board measurement")
    raise ValueError(f"unknown device profile {name!r}; known: {', '.join(PROFILES)}")


PROFILES = ("host", "imx95-emulated")
