"""In-transport link emulation (node.shaping.Link) driven by a fake clock: no real sleeping."""
import pytest

from node.shaping import Link


class FakeTime:
    """A clock that only moves when told to; sleep() records and (optionally) advances it."""

    def __init__(self, advance_on_sleep=True):
        self.now = 100.0
        self.sleeps = []
        self.advance_on_sleep = advance_on_sleep

    def clock(self):
        return self.now

    def sleep(self, s):
        assert s > 0, "Link must not sleep for a non-positive time"
        self.sleeps.append(s)
        if self.advance_on_sleep:
            self.now += s


def _link(rate_mbit, latency_ms, **kw):
    t = FakeTime(**kw)
    return Link(rate_mbit, latency_ms, clock=t.clock, sleep=t.sleep), t


@pytest.mark.parametrize("rate_mbit, latency_ms, nbytes", [
    (8.0, 10.0, 1000),          # 8000 bit / 8e6 bit/s = 1 ms + 10 ms
    (1.0, 0.0, 125_000),        # 1 Mbit over 1 Mbit/s = 1 s
    (20.0, 5.0, 3_000_000),     # 24e6 / 20e6 = 1.2 s + 5 ms
    (0.5, 100.0, 0),            # empty message: latency only
])
def test_delay_is_latency_plus_serialization(rate_mbit, latency_ms, nbytes):
    link, _ = _link(rate_mbit, latency_ms)
    expected = latency_ms / 1e3 + 8 * nbytes / (rate_mbit * 1e6)
    assert link.delay_for(nbytes) == pytest.approx(expected, rel=1e-12)


def test_delay_examples_exact():
    link, _ = _link(8.0, 10.0)
    assert link.delay_for(1000) == pytest.approx(0.011)
    assert link.delay_for(2000) - link.delay_for(1000) == pytest.approx(0.001)


def test_unlimited_rate_gives_latency_only():
    link, _ = _link(0.0, 25.0)
    for n in (0, 1, 10**9):
        assert link.delay_for(n) == pytest.approx(0.025)


def test_unshaped_link_never_sleeps():
    link, t = _link(0.0, 0.0)
    assert link.transfer(10**9) == 0.0
    assert t.sleeps == []


def test_transfer_sleeps_for_the_delay():
    link, t = _link(8.0, 10.0)
    spent = link.transfer(1000)
    assert t.sleeps == [pytest.approx(0.011)]
    assert spent == pytest.approx(0.011)
    assert t.now == pytest.approx(100.011)


def test_back_to_back_transfers_queue():
    # two messages handed to the link at the same instant (e.g. by two threads): the clock
    # does not move while they wait, so the second must wait for the first as well
    link, t = _link(8.0, 0.0, advance_on_sleep=False)
    link.transfer(1_000_000)   # 1 s on the link
    link.transfer(500_000)     # 0.5 s, behind the first
    assert t.sleeps == [pytest.approx(1.0), pytest.approx(1.5)]


def test_queued_messages_wait_for_serialization_not_for_latency():
    # latency is propagation: two messages in flight overlap in it, they only queue for the wire
    link, t = _link(8.0, 10.0, advance_on_sleep=False)
    link.transfer(1000)   # 1 ms on the wire + 10 ms latency
    link.transfer(1000)   # waits for the first's 1 ms, then its own 1 ms + 10 ms
    assert t.sleeps == [pytest.approx(0.011), pytest.approx(0.012)]


def test_partly_overlapping_transfer_waits_only_the_remainder():
    link, t = _link(8.0, 0.0, advance_on_sleep=False)
    link.transfer(1_000_000)       # busy until 101.0
    t.now += 0.4                   # next message arrives while the first still occupies the link
    link.transfer(1_000_000)       # starts at 101.0, done at 102.0: waits 1.6 s from 100.4
    assert t.sleeps[1] == pytest.approx(1.6)


def test_idle_link_does_not_carry_old_backlog():
    link, t = _link(8.0, 0.0)
    link.transfer(1_000_000)       # 100 -> 101
    t.now += 10.0                  # link idle for a long time
    spent = link.transfer(1_000_000)
    assert spent == pytest.approx(1.0)
    assert t.sleeps == [pytest.approx(1.0), pytest.approx(1.0)]


def test_transfer_returns_time_spent_when_clock_moves_by_itself():
    # sleep that overshoots (as real sleeps do): transfer reports what was actually spent
    t = FakeTime(advance_on_sleep=False)

    def slow_sleep(s):
        t.sleeps.append(s)
        t.now += s + 0.003

    link = Link(8.0, 0.0, clock=t.clock, sleep=slow_sleep)
    assert link.transfer(8000) == pytest.approx(0.008 + 0.003)


@pytest.mark.parametrize("rate, latency", [(-1.0, 0.0), (0.0, -5.0), (-0.001, -0.001)])
def test_negative_rate_or_latency_raises(rate, latency):
    with pytest.raises(ValueError, match=">= 0"):
        Link(rate, latency)
