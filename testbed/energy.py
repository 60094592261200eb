"""Energy of a device's rounds, from the phases it measured and its profile's power model.

A device sampled for a round is on for the whole round (in emulated seconds, as every time in a
run): it computes, sends, receives, and waits for the others. Its energy in the round is

    idle_w x wall_s                                   (on for the round)
  + (compute_w - idle_w) x compute_s                  (training at full load)
  + (tx_w - idle_w) x upload_s + (rx_w - idle_w) x download_s      (radio, by power)
    or  tx_nj_per_byte x bytes_up + rx_nj_per_byte x bytes_down    (radio, by byte)

with the figures of `emulation.profiles.Power` (board power in each state; docs/profiles.md gives
their sources). Devices not sampled for a round are not counted: they may be doing anything
else. A device that failed or was dropped is counted for the phases it recorded and the idle
rest of the round: its energy was spent all the same. Under an asynchronous strategy a row holds
the tasks that ended in its step, and each counts from its dispatch to its return.
"""
from __future__ import annotations

from dataclasses import dataclass

from emulation.profiles import Power

NJ = 1e-9


@dataclass(frozen=True)
class Energy:
    """Joules of one or more node-rounds, by what they were spent on."""
    idle_j: float = 0.0      # the board on, over the round's length
    compute_j: float = 0.0   # training, above idle
    radio_j: float = 0.0     # sending and receiving, above idle

    @property
    def total_j(self) -> float:
        return self.idle_j + self.compute_j + self.radio_j

    def __add__(self, other: "Energy") -> "Energy":
        return Energy(self.idle_j + other.idle_j, self.compute_j + other.compute_j, self.radio_j + other.radio_j)


def node_round(power: Power, wall_s: float, record: dict) -> Energy:
    """One device's energy in a round it was sampled for (`record`: its rounds.jsonl node record)."""
    def phase(key: str) -> float:
        return float(record.get(key) or 0.0)
    compute_s, up_s, down_s = phase("compute_s"), phase("upload_s"), phase("download_s")
    on_s = max(float(wall_s or 0.0), compute_s + up_s + down_s)  # a straggler past the deadline was on too
    if power.tx_w is not None:
        radio = (power.tx_w - power.idle_w) * up_s + (power.rx_w - power.idle_w) * down_s
    else:
        radio = (power.tx_nj_per_byte * phase("bytes_up") + power.rx_nj_per_byte * phase("bytes_down")) * NJ
    return Energy(power.idle_w * on_s, (power.compute_w - power.idle_w) * compute_s, radio)


def round_energy(row: dict, powers: dict[str, Power]) -> dict[str, Energy] | None:
    """Energy of each device class (profile) in one rounds.jsonl row; None if a profile of the
    row has no power model."""
    out: dict[str, Energy] = {}
    for nd in row.get("nodes") or []:
        profile = str(nd.get("profile", "?"))
        if profile not in powers:
            return None
        # an asynchronous task (testbed/asyncloop.py) is on from its dispatch to its return, across steps
        on_s = nd["returned_s"] - nd["sent_s"] if "sent_s" in nd else row.get("wall_s") or 0.0
        out[profile] = out.get(profile, Energy()) + node_round(powers[profile], on_s, nd)
    return out
