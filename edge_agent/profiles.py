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
                    the vision stage split by its MEASURED int8 coverage: the int8 share of its
                    multiply-accumulates (MACs) on the i.MX95's eIQ Neutron NPU, PROJECTED under a
                    stated assumption (`NPUAssumption`), the float share on the Cortex-A55s
                    (host-measured vision × that share × the imx95 factor, PROJECTED); every other
                    edge stage as imx95-emulated (host × factor)

The NPU assumption: 2 TOPS int8 peak (NXP's figure for the i.MX95's eIQ Neutron NPU; 1 MAC =
2 ops), the int8 part fed through LiteRT with the Neutron delegate, at 25 % effective
utilisation: a ViT's dense matmuls map onto the NPU, but layout changes and the DDR traffic of
the encoder's weights do not run at peak. 25 % is a judgement, not a measurement; override it
with PROGVLM_NPU_UTILISATION (and PROGVLM_NPU_TOPS), or replace it with a board measurement.

The coverage is measured (`vision_coverage`): the fraction of the vision half's MACs that the
int8 LiteRT export (litert-torch PT2E, edge_agent/litert_export.py) runs in int8, read from the
measurement files in docs/bench (COVERAGE_MEASUREMENTS, one per VLM family: the bundled model's
export and the SmolVLM-256M-shaped stand-in's). The rest (attention matmuls; LayerNorm, softmax
and GELU, which hold no MACs) falls back to float and stays on the A55s. The model of the split:

    vision_ms = 2 × MACs × f / (TOPS × utilisation)  +  host_vision_ms × (1 − f) × factor

with f the int8 MAC fraction: the float ops' time is taken as their MAC share of the host's
vision time (the float elementwise ops are not costed beyond that, nor the NPU↔CPU hand-overs
between them, so this is optimistic for the A55 part). A family with no measurement gets the
lowest measured fraction (labelled a fallback in the profile's source);
PROGVLM_NPU_INT8_MAC_FRACTION sets f for any VLM. int8 quantisation's accuracy is measured for
the bundled model only (README, "On the i.MX95"). The agent does not offer this profile: it
scales every stage by one factor and knows no MACs; `DeviceProfile.stage_ms` is the call it
would use to adopt it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from progvlm import ROOT


@dataclass(frozen=True)
class NPUAssumption:
    """The stated assumption behind a projected NPU time: peak int8 TOPS × utilisation."""
    peak_tops_int8: float = 2.0
    utilisation: float = 0.25
    runtime: str = "LiteRT + eIQ Neutron delegate, the int8 ops"

    def ms_for_macs(self, macs: float) -> float:
        """Projected wall time (ms) of `macs` multiply-accumulates (2 ops each) on the NPU."""
        return 2.0 * macs / (self.peak_tops_int8 * 1e12 * self.utilisation) * 1e3

    def describe(self) -> str:
        return (f"{self.peak_tops_int8:g} TOPS int8 peak × {100 * self.utilisation:g} % effective "
                f"utilisation ({self.runtime}); 1 MAC = 2 ops")


@dataclass(frozen=True)
class NPUCoverage:
    """The fraction of the vision half's MACs that run int8 (on the NPU), and where it came from."""
    int8_mac_fraction: float
    source: str
    measured: bool

    def __post_init__(self):
        if not 0.0 <= self.int8_mac_fraction <= 1.0:
            raise ValueError(f"an int8 MAC fraction is in [0, 1], got {self.int8_mac_fraction!r} "
                             f"({self.source})")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    compute_factor: float  # multiplies measured compute times; 1.0 = measured as is
    threads: int | None  # intra-op threads for the runtime; None = the runtime's default
    source: str
    npu: NPUAssumption | None = None  # set: edge_vision is projected from MACs on the NPU
    coverage: NPUCoverage | None = None  # with npu: which share of the MACs the NPU takes

    def __post_init__(self):
        if (self.npu is None) != (self.coverage is None):
            raise ValueError("an NPU profile needs both the NPU assumption and the int8 coverage")

    @property
    def projected(self) -> bool:
        return self.compute_factor != 1.0 or self.npu is not None

    def stage_ms(self, stage: str, host_ms: float, vision_macs: float | None = None) -> float:
        """This device's time for one edge stage that took `host_ms` on this host (with
        `threads` threads). Under an NPU profile, edge_vision comes from `vision_macs` instead."""
        if stage == "edge_vision" and self.npu is not None:
            return sum(self.vision_split_ms(host_ms, vision_macs).values())
        return host_ms * self.compute_factor

    def vision_split_ms(self, host_ms: float, vision_macs: float | None) -> dict:
        """Under an NPU profile, edge_vision's two parts: the int8 MACs on the NPU (projected
        from MACs) and the float fallback on the A55s (host_ms × its MAC share × the factor)."""
        if self.npu is None:
            raise ValueError(f"profile {self.name} has no NPU")
        if vision_macs is None:
            raise ValueError(f"profile {self.name} projects edge_vision from the vision "
                             "encoder's MACs; none were given")
        f = self.coverage.int8_mac_fraction
        return {"npu": self.npu.ms_for_macs(vision_macs * f),
                "a55_fallback": host_ms * (1.0 - f) * self.compute_factor}

    def details(self, host_vision_ms: float, vision_macs: float | None) -> dict:
        """What a record of this profile adds: the NPU split of edge_vision and its coverage."""
        if self.npu is None:
            return {}
        split = self.vision_split_ms(host_vision_ms, vision_macs)
        return {"edge_vision_npu_ms": split["npu"], "edge_vision_a55_fallback_ms": split["a55_fallback"],
                "int8_mac_fraction": self.coverage.int8_mac_fraction,
                "coverage_source": self.coverage.source, "coverage_measured": self.coverage.measured}


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


# where each VLM family's vision coverage was measured: (file in MEASUREMENTS, keys down to the
# op_coverage of the vision half's int8 LiteRT export)
MEASUREMENTS = ROOT / "docs" / "bench"
COVERAGE_MEASUREMENTS = {
    # the bundled model: eval-mae --edge-runtime litert on its int8 export
    "bundled": ("litert_int8_eval_mae.json", ("op_coverage", "vision")),
    # the SmolVLM-256M-shaped stand-in (SigLIP-B/16 + pixel shuffle): docs/bench/litert_standin.py
    "idefics3": ("litert_standin.json", ("int8",)),
}
COVERAGE_ENV = "PROGVLM_NPU_INT8_MAC_FRACTION"


def measured_coverages(folder: Path = MEASUREMENTS) -> dict[str, NPUCoverage]:
    """Every family's measured int8 MAC fraction that its measurement file holds."""
    found = {}
    for family, (name, keys) in COVERAGE_MEASUREMENTS.items():
        path = Path(folder) / name
        if not path.is_file():
            continue
        entry = json.loads(path.read_text())
        for key in keys:
            entry = entry[key]
        found[family] = NPUCoverage(float(entry["int8_mac_fraction"]),
                                    f"measured on {family}'s int8 LiteRT export, docs/bench/{name}", True)
    return found


def vision_coverage(family: str | None, folder: Path = MEASUREMENTS) -> NPUCoverage:
    """The int8 MAC coverage of a VLM family's vision half: $PROGVLM_NPU_INT8_MAC_FRACTION if set,
    else its measurement, else (a fallback, said so) the lowest measured fraction."""
    raw = os.environ.get(COVERAGE_ENV)
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{COVERAGE_ENV} must be a number, got {raw!r}") from None
        return NPUCoverage(value, f"set by {COVERAGE_ENV}", False)
    measured = measured_coverages(folder)
    if family in measured:
        return measured[family]
    if not measured:
        raise ValueError(f"no measured int8 coverage in {folder} "
                         f"({', '.join(n for n, _ in COVERAGE_MEASUREMENTS.values())}); set "
                         f"{COVERAGE_ENV} to project the NPU")
    lowest = min(measured, key=lambda fam: measured[fam].int8_mac_fraction)
    f = measured[lowest].int8_mac_fraction
    return NPUCoverage(f, f"fallback: no measured coverage for {family or 'this VLM'}; the lowest "
                          f"measured ({lowest}: {100 * f:.1f} % of the MACs in int8)", False)


def npu_profile(family: str | None = None) -> DeviceProfile:
    """imx95-npu-projected for a VLM family (split.info()["family"]): vision's int8 MACs on the
    eIQ Neutron NPU (projected from MACs), its float fallback and the other edge stages on one
    Cortex-A55 (host-measured × the imx95 factor, projected). For cost projections (the bench);
    see the module docstring for the model and its assumptions."""
    stated = NPUAssumption()  # the defaults: its fields
    npu = NPUAssumption(_positive_env("PROGVLM_NPU_TOPS", stated.peak_tops_int8),
                        _positive_env("PROGVLM_NPU_UTILISATION", stated.utilisation, at_most=1.0))
    coverage = vision_coverage(family)
    factor = _imx95_factor()
    return DeviceProfile(NPU_PROFILE, factor, 1,
                         f"projected: edge_vision split by its int8 coverage "
                         f"({100 * coverage.int8_mac_fraction:.1f} % of the MACs; {coverage.source}): "
                         f"the int8 MACs on the i.MX95 eIQ Neutron NPU at {npu.describe()}, the "
                         f"float fallback on the Cortex-A55s (host-measured vision × its MAC share × "
                         f"{factor:g}); other edge stages host-measured (1 thread) × {factor:g}, an "
                         "assumed Cortex-A55 factor; not a board measurement", npu, coverage)


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
