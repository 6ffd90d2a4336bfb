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

    imx95-npu-projected  a cost projection for real-size VLMs (`python -m progvlm bench --images`):
                    the vision stage on the i.MX95's eIQ Neutron NPU, PROJECTED from the vision
                    encoder's multiply-accumulates (MACs) under a stated assumption
                    (`NPUAssumption`); every other edge stage as imx95-emulated (host × factor)

The NPU assumption: 2 TOPS int8 peak (NXP's figure for the i.MX95's eIQ Neutron NPU; 1 MAC =
2 ops), the model quantised to int8 and fed through LiteRT with the Neutron delegate, at 25 %
effective utilisation: a ViT's dense matmuls map onto the NPU, but softmax, LayerNorm, GELU,
layout changes and the DDR traffic of the encoder's weights do not run at peak, and ops the
delegate lacks fall back to the A55s. 25 % is a judgement, not a measurement; override it with
PROGVLM_NPU_UTILISATION (and PROGVLM_NPU_TOPS), or replace it with a board measurement. int8
quantisation's effect on accuracy is not modelled. The agent does not offer this profile: it
scales every stage by one factor and knows no MACs; `DeviceProfile.stage_ms` is the call it
would use to adopt it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class NPUAssumption:
    """The stated assumption behind a projected NPU time: peak int8 TOPS × utilisation."""
    peak_tops_int8: float = 2.0
    utilisation: float = 0.25
    runtime: str = "LiteRT + eIQ Neutron delegate, int8"

    def ms_for_macs(self, macs: float) -> float:
        """Projected wall time (ms) of `macs` multiply-accumulates (2 ops each) on the NPU."""
        return 2.0 * macs / (self.peak_tops_int8 * 1e12 * self.utilisation) * 1e3

    def describe(self) -> str:
        return (f"{self.peak_tops_int8:g} TOPS int8 peak × {100 * self.utilisation:g} % effective "
                f"utilisation ({self.runtime}); 1 MAC = 2 ops")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    compute_factor: float  # multiplies measured compute times; 1.0 = measured as is
    threads: int | None  # intra-op threads for the runtime; None = the runtime's default
    source: str
    npu: NPUAssumption | None = None  # set: edge_vision is projected from MACs on the NPU

    @property
    def projected(self) -> bool:
        return self.compute_factor != 1.0 or self.npu is not None

    def stage_ms(self, stage: str, host_ms: float, vision_macs: float | None = None) -> float:
        """This device's time for one edge stage that took `host_ms` on this host (with
        `threads` threads). Under an NPU profile, edge_vision comes from `vision_macs` instead."""
        if stage == "edge_vision" and self.npu is not None:
            if vision_macs is None:
                raise ValueError(f"profile {self.name} projects edge_vision from the vision "
                                 "encoder's MACs; none were given")
            return self.npu.ms_for_macs(vision_macs)
        return host_ms * self.compute_factor


def _imx95_factor() -> float:
    raw = os.environ.get("PROGVLM_IMX95_FACTOR", "7.0")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"PROGVLM_IMX95_FACTOR must be a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"PROGVLM_IMX95_FACTOR must be positive, got {raw!r}")
    return value


def _positive_env(name: str, default: float, at_most: float | None = None) -> float:
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0 or (at_most is not None and value > at_most):
        raise ValueError(f"{name} must be in (0, {at_most if at_most is not None else 'inf'}], "
                         f"got {raw!r}")
    return value


def npu_profile() -> DeviceProfile:
    """imx95-npu-projected: vision on the eIQ Neutron NPU (projected from MACs), the other edge
    stages on one Cortex-A55 (host-measured × the imx95 factor, projected). For cost
    projections (the bench); see the module docstring for the assumption."""
    npu = NPUAssumption(_positive_env("PROGVLM_NPU_TOPS", 2.0),
                        _positive_env("PROGVLM_NPU_UTILISATION", 0.25, at_most=1.0))
    factor = _imx95_factor()
    return DeviceProfile(NPU_PROFILE, factor, 1,
                         f"projected: edge_vision on the i.MX95 eIQ Neutron NPU from the vision "
                         f"encoder's MACs at {npu.describe()}; other edge stages host-measured "
                         f"(1 thread) × {factor:g}, an assumed Cortex-A55 factor; not a board "
                         "measurement", npu)


def get_profile(name: str) -> DeviceProfile:
    if name == "host":
        return DeviceProfile("host", 1.0, 1, "measured on this host (1 thread)")
    if name == "imx95-emulated":
        factor = _imx95_factor()
        return DeviceProfile("imx95-emulated", factor, 1,
                             f"projected: host-measured (1 thread) × {factor:g}, an assumed "
                             "Cortex-A55 vs x86 single-core speed factor, not a board measurement")
    if name == NPU_PROFILE:
        raise ValueError(f"{NPU_PROFILE} is a cost projection from the vision encoder's MACs "
                         "(python -m progvlm bench --images); the agent cannot run it yet: "
                         f"choose one of {', '.join(PROFILES)}")
    raise ValueError(f"unknown device profile {name!r}; known: {', '.join(PROFILES)}")


PROFILES = ("host", "imx95-emulated")  # what the agent runs
NPU_PROFILE = "imx95-npu-projected"  # what the bench projects (npu_profile())
