"""cgroup v1 and v2 file layouts, against a fake /sys/fs/cgroup (real hosts are mostly v2)."""
from __future__ import annotations

import pytest

from emulation import cgroups
from emulation.cgroups import CGroup


def test_v1_writes_quota_and_memory(tmp_path):
    for ctrl in ("cpu", "memory"):
        (tmp_path / ctrl).mkdir()
    cg = CGroup("run1", "n0", 1, root=tmp_path)
    cg.create(cpu_share=0.25, memory_mb=512)
    assert (tmp_path / "cpu/fedge/run1/n0/cpu.cfs_quota_us").read_text() == "25000"
    assert (tmp_path / "cpu/fedge/run1/n0/cpu.cfs_period_us").read_text() == "100000"
    assert (tmp_path / "memory/fedge/run1/n0/memory.limit_in_bytes").read_text() == str(512 * 2**20)
    assert cg.limits() == {"cpu_share": 0.25, "cpu_weight": 1024, "memory_bytes": 512 * 2**20}
    (tmp_path / "memory/fedge/run1/n0/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (tmp_path / "memory/fedge/run1/n0/memory.max_usage_in_bytes").write_text(str(300 * 2**20))
    assert cg.oom_kills() == 2 and not cg.hit_limit()  # far below its limit: the host ran out
    (tmp_path / "memory/fedge/run1/n0/memory.max_usage_in_bytes").write_text(str(511 * 2**20))
    assert cg.hit_limit()  # it reached its limit: those kills were its own


def test_v2_enables_controllers_and_writes_max(tmp_path):
    (tmp_path / "cgroup.subtree_control").write_text("")
    cg = CGroup("run2", "n1", 2, v2_root=tmp_path)
    # a fake tree does not propagate subtree_control files: create them as the kernel would
    (tmp_path / "fedge").mkdir()
    (tmp_path / "fedge/cgroup.subtree_control").write_text("")
    cg.create(cpu_share=1.5, memory_mb=100)
    assert (tmp_path / "fedge/run2/n1/cpu.max").read_text() == "150000 100000"
    assert (tmp_path / "fedge/run2/n1/memory.max").read_text() == str(100 * 2**20)
    assert "+memory" in (tmp_path / "fedge/cgroup.subtree_control").read_text()
    assert cg.limits()["cpu_share"] == 1.5
    (tmp_path / "fedge/run2/n1/memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_kills() == 1 and cg.hit_limit()
    (tmp_path / "fedge/run2/n1/memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 1\n")
    assert cg.oom_kills() == 1 and not cg.hit_limit()  # killed because the host ran out, not its limit
    (tmp_path / "fedge/run2/n1/memory.peak").write_text("1048576\n")
    assert cg.peak_memory_bytes() == 1048576


def test_by_weight_lifts_the_quota_and_weighs_by_share(tmp_path):
    """cpu_limit: weight: no CFS quota, a weight of 10,000 per core of share (v1 cpu.shares,
    v2 cpu.weight, each clamped to the kernel's range); a group can switch back to a quota."""
    for ctrl in ("cpu", "memory"):
        (tmp_path / ctrl).mkdir()
    slow, fast = CGroup("r", "slow", 1, root=tmp_path), CGroup("r", "fast", 1, root=tmp_path)
    slow.create(cpu_share=0.25 / 3.75, memory_mb=512, by_weight=True)   # a TX2 at dilation 3.75
    fast.create(cpu_share=1.0 / 3.75, memory_mb=512, by_weight=True)    # an AGX Xavier
    assert (tmp_path / "cpu/fedge/r/slow/cpu.cfs_quota_us").read_text() == "-1"
    assert (tmp_path / "cpu/fedge/r/slow/cpu.shares").read_text() == "667"
    assert (tmp_path / "cpu/fedge/r/fast/cpu.shares").read_text() == "2667"
    assert slow.limits() == {"cpu_share": None, "cpu_weight": 667, "memory_bytes": 512 * 2**20}
    slow.set_limits(0.25, 512)
    assert slow.limits()["cpu_share"] == 0.25 and slow.limits()["cpu_weight"] == 1024
    (tmp_path / "fedge").mkdir()
    (tmp_path / "fedge/cgroup.subtree_control").write_text("")
    (tmp_path / "cgroup.subtree_control").write_text("")
    v2 = CGroup("r2", "n", 2, v2_root=tmp_path)
    v2.create(cpu_share=2.0, memory_mb=64, by_weight=True)
    assert (tmp_path / "fedge/r2/n/cpu.max").read_text() == "max 100000"
    assert (tmp_path / "fedge/r2/n/cpu.weight").read_text() == "10000"  # 20,000 clamped to v2's largest
    assert v2.limits()["cpu_share"] is None


def test_leftovers_lists_deepest_first(tmp_path):
    for ctrl in ("cpu", "memory"):
        (tmp_path / ctrl / "fedge" / "runA" / "n0").mkdir(parents=True)
    found = cgroups.leftovers(1, root=tmp_path)
    assert found.index(tmp_path / "cpu/fedge/runA/n0") < found.index(tmp_path / "cpu/fedge/runA")
    assert found[-1] == tmp_path / "memory/fedge" and tmp_path / "cpu/fedge" in found  # parents last
    assert cgroups.leftovers(1, root=tmp_path, run_id="other") == []
    assert tmp_path / "cpu/fedge" not in cgroups.leftovers(1, root=tmp_path, run_id="runA")


def test_empty_parents_go_after_a_run_busy_ones_stay(tmp_path):
    (tmp_path / "cpu/fedge/live-run").mkdir(parents=True)
    (tmp_path / "memory/fedge").mkdir(parents=True)
    cgroups.remove_empty_parents(root=tmp_path)
    assert (tmp_path / "cpu/fedge/live-run").is_dir()  # another run's groups are inside
    assert not (tmp_path / "memory/fedge").exists()
    cgroups.remove_empty_parents(root=tmp_path)  # missing parents are no error


def test_a_group_is_made_even_when_another_run_removes_the_parent_meanwhile(tmp_path):
    """Two runs side by side: one ending removes the empty `fedge` parent between the other's
    making it and making its own directory inside (ENOENT there); creating starts over."""
    (tmp_path / "cgroup.subtree_control").write_text("")
    cg = CGroup("runB", "n0", 2, v2_root=tmp_path)
    real = cg._enable_v2_controllers
    calls = []

    def parent_removed_once():
        calls.append(1)
        if len(calls) == 1:
            (tmp_path / "fedge").mkdir()
            cgroups.remove_empty_parents(tmp_path)  # run A ends: the parent is empty, so it goes
            (tmp_path / "fedge" / "runB").mkdir()   # FileNotFoundError, as the kernel says
        real()

    cg._enable_v2_controllers = parent_removed_once
    cg.create(cpu_share=0.5, memory_mb=64)
    assert len(calls) == 2
    assert (tmp_path / "fedge/runB/n0/cpu.max").read_text() == "50000 100000"


def test_a_finished_run_takes_its_own_directory_with_it(tmp_path):
    """Removing a run's node groups leaves fedge/<run>; remove_run takes it (a benchmark once
    left five such directories behind), and leaves another run's alone."""
    for ctrl in ("cpu", "memory"):
        (tmp_path / ctrl / "fedge/runA/n0").mkdir(parents=True)
        (tmp_path / ctrl / "fedge/runB/n0").mkdir(parents=True)
    cgroups.remove_run("runA", 1, root=tmp_path)
    assert not (tmp_path / "cpu/fedge/runA").exists() and not (tmp_path / "memory/fedge/runA").exists()
    assert (tmp_path / "cpu/fedge/runB/n0").is_dir()
    cgroups.remove_run("runB", 1, root=tmp_path)
    assert not (tmp_path / "cpu/fedge").exists() and not (tmp_path / "memory/fedge").exists()


def test_bad_version():
    with pytest.raises(ValueError, match="1 or 2"):
        CGroup("r", "n", 3)
