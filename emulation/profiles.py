"""Device profiles: how fast, how much memory, and what link a device has.

`cpu_share` is the device's training throughput for this workload in units of ONE core of
the reference host (the machine the testbed was calibrated on), so a profile maps directly
onto a CPU quota (cgroup cfs_quota = cpu_share x period) or, without cgroups, onto stretching
compute time by 1/cpu_share. Nothing here is a datasheet figure for the transformer step
itself; each number says where it comes from, and `python -m testbed calibrate` is
the way to replace an estimate with a measurement of a real device.

Sources of the figures:
- Relative CPU speed of the Jetsons: the reconstruction of the LEGEND platform (docs/profiles.md),
  TX2 : Xavier NX : AGX Xavier = 1 : 2 : 4, anchored so that AGX Xavier = 1.0 host core.
- Raspberry Pi 4 / 5: public Geekbench 5 single-core scores (Pi 4 about 250, Pi 5 about 700)
  against about 1400 for a current x86 server core like the reference host: 0.18 and 0.5.
- Memory: the boards' RAM (Pi 4 4 GB model, Pi 5 8 GB, TX2 8 GB, NX 8 GB, AGX 32 GB), minus
  about 1 GB each for the OS; TX2/NX/AGX share RAM with their GPU.
- Links: WiFi rates of the LEGEND platform (1-30 Mbit/s, docs/profiles.md); Pi on 802.11ac
  typical home uplink/downlink; latency a typical one-hop WiFi RTT/2.
- CAFF groups strong / medium / weak: budgets 1.0 / 0.66 / 0.33 of full training
  (CAFF, docs/strategies.md): cpu share scales with the budget; the memory limit is the process
  baseline (503 MB) + budget x the training memory of full fine-tuning of the 6-block MiniLM
  (485 MB at batch 32, length 32), both from testbed.costmodel, + 10% headroom.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Power:
    """A device's power draw in watts by state, the whole board each time (testbed/energy.py):
    idle, training at full load, and the radio either as the board's draw while sending and
    receiving (tx_w, rx_w) or as energy per byte above idle (tx_nj_per_byte, rx_nj_per_byte)."""
    idle_w: float
    compute_w: float
    tx_w: float | None = None
    rx_w: float | None = None
    tx_nj_per_byte: float | None = None
    rx_nj_per_byte: float | None = None
    source: str = ""

    def __post_init__(self):
        numbers = {k: getattr(self, k) for k in ("idle_w", "compute_w", "tx_w", "rx_w", "tx_nj_per_byte",
                                                  "rx_nj_per_byte")}
        bad = [k for k, v in numbers.items() if v is not None and not (isinstance(v, (int, float)) and v >= 0)]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be numbers >= 0")
        if self.compute_w < self.idle_w:
            raise ValueError(f"compute_w ({self.compute_w}) must be at least idle_w ({self.idle_w})")
        by_power = self.tx_w is not None and self.rx_w is not None
        by_byte = self.tx_nj_per_byte is not None and self.rx_nj_per_byte is not None
        if by_power == by_byte or (by_power and (self.tx_nj_per_byte, self.rx_nj_per_byte) != (None, None)) \
                or (by_byte and (self.tx_w, self.rx_w) != (None, None)):
            raise ValueError("give the radio either as tx_w and rx_w (the board's draw while sending and "
                             "receiving) or as tx_nj_per_byte and rx_nj_per_byte, not both and not half")
        if by_power and min(self.tx_w, self.rx_w) < self.idle_w:
            raise ValueError("tx_w and rx_w are the whole board's draw and must be at least idle_w")


@dataclass(frozen=True)
class Profile:
    name: str
    cpu_share: float      # host cores' worth of compute (see module docstring)
    threads: int          # torch threads the node uses
    memory_mb: int        # memory limit of the sandbox
    uplink_mbit: float    # node -> aggregator
    downlink_mbit: float  # aggregator -> node
    latency_ms: float     # one-way
    source: str
    power: Power | None = None  # for the energy of its rounds (None: not reported)

    def __post_init__(self):
        if isinstance(self.power, dict):  # read back from a manifest, a snapshot or a scenario
            object.__setattr__(self, "power", Power(**self.power))

    def with_overrides(self, **kw) -> "Profile":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def as_dict(self) -> dict:
        return asdict(self)


# Power draw (docs/profiles.md#power-and-energy has every source): the radio adds 0.9 W while
# sending and 0.28 W while receiving (an 802.11n client chip's datasheet, ATWILC3000 at 3.3 V);
# a Pi trains on 1 of its 4 cores, so idle + a quarter of (all-core stress - idle); a Jetson
# trains on its GPU at its power mode's budget (a cap, not a reading).
TX_W, RX_W = 0.9, 0.28


def _power(idle_w: float, compute_w: float, source: str) -> Power:
    return Power(idle_w, round(compute_w, 3), round(idle_w + TX_W, 3), round(idle_w + RX_W, 3), source=source)


PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("rpi4", 0.18, 1, 3072, 20.0, 40.0, 5.0, "Raspberry Pi 4B 4GB; Geekbench 5 single-core ratio",
            _power(3.1, 3.1 + (6.1 - 3.1) / 4, "Raspberry Pi documentation: 0.6 A idle, 1.2 A stress at 5.1 V")),
    Profile("rpi5", 0.5, 1, 7168, 40.0, 80.0, 5.0, "Raspberry Pi 5 8GB; Geekbench 5 single-core ratio",
            _power(2.8, 2.8 + (9.7 - 2.8) / 4, "Geerling sbc-reviews: 2.8 W idle, 9.7 W stress-ng at the wall")),
    Profile("jetson-tx2", 0.25, 1, 7168, 10.0, 10.0, 10.0, "LEGEND TX2 class, speed 1 of 1:2:4 (docs/profiles.md)",
            _power(3.1, 15.0, "tegrastats idle reading 3.1 W; Max-P mode budget 15 W")),
    Profile("xavier-nx", 0.5, 1, 7168, 10.0, 10.0, 10.0, "LEGEND Xavier NX class, speed 2 of 1:2:4",
            _power(4.1, 15.0, "tegrastats light-load reading 4.1 W as idle (an upper bound); 15 W mode budget")),
    Profile("agx-xavier", 1.0, 1, 31744, 10.0, 10.0, 10.0, "LEGEND AGX Xavier class, speed 4 of 1:2:4",
            _power(7.6, 30.0, "tegrastats idle reading 7.6 W (8 cores on); 30 W mode budget")),
    Profile("caff-strong", 1.0, 1, 1086, 20.0, 20.0, 10.0, "CAFF strong group, budget 1.0 of full training"),
    Profile("caff-medium", 0.66, 1, 905, 13.2, 20.0, 10.0, "CAFF medium group, budget 0.66"),
    Profile("caff-weak", 0.33, 1, 729, 6.6, 20.0, 10.0, "CAFF weak group, budget 0.33"),
    Profile("host", 1.0, 1, 4096, 0.0, 0.0, 0.0, "this host, one core, unshaped link (0 = unlimited)"),
]}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]
