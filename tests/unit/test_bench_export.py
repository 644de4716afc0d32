"""bench/bench_export.py's measuring and scoring, on small real processes: the process-tree RSS poller, the written
bytes from the kernel's I/O accounting, and the targets' ratios."""

from __future__ import annotations

import os
import sys
import textwrap

import psutil
import pytest

from tests.conftest import bench_module

bench = bench_module("bench_export")

MiB = 1 << 20

# A parent that holds 64 MiB and starts a child holding 160 MiB: only the tree's sum reaches 224 MiB.
# The child also writes 24 MiB to a file and deletes it (an intermediate that must still count as written).
TREE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    held = bytearray(64 << 20)
    if len(sys.argv) == 2:
        child = subprocess.Popen([sys.executable, __file__, sys.argv[1], "child"])
        child.wait()
        sys.exit(child.returncode)
    held2 = bytearray(160 << 20)
    path = os.path.join(sys.argv[1], "intermediate.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(24 << 20))
    os.remove(path)
    time.sleep(1.5)
    """
)


def write_accounting_works(folder) -> bool:
    """Whether this file system accounts written bytes (tmpfs does not)."""
    me = psutil.Process()
    before = me.io_counters().write_bytes
    with open(folder / "probe.bin", "wb") as f:
        f.write(os.urandom(4 * MiB))
    (folder / "probe.bin").unlink()
    return me.io_counters().write_bytes - before >= 4 * MiB


def test_stage_measures_the_whole_tree(tmp_path):
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    stage = bench.run_stage(
        "t", "tree", [sys.executable, str(script), str(tmp_path)], log_path=tmp_path / "tree.log", cwd=tmp_path
    )
    assert stage.returncode == 0
    assert stage.peak_rss >= 224 * MiB  # neither process alone holds that much
    assert stage.peak_anon >= 200 * MiB
    assert 1.5 <= stage.seconds < 30
    if not write_accounting_works(tmp_path):
        pytest.skip("this file system does not account written bytes (tmpfs)")
    assert stage.written >= 24 * MiB  # the grandchild's deleted file, through both waits


def test_a_failing_stage_stops_the_bench_unless_unchecked(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('broken on purpose'); sys.exit(3)"]
    with pytest.raises(SystemExit, match="broken on purpose"):
        bench.run_stage("t", "fail", cmd, log_path=tmp_path / "fail.log", cwd=tmp_path)
    assert bench.run_stage("t", "fail", cmd, log_path=tmp_path / "f2.log", cwd=tmp_path, check=False).returncode == 3


def route(seconds, rss, written, left=0):
    stage = bench.Stage("r", "s", seconds=seconds, peak_rss=rss, peak_anon=rss // 2, written=written)
    return bench.route_total([stage, bench.Stage("r", "s2", seconds=1.0, peak_rss=rss // 4, written=1)], left)


def test_route_totals_and_targets():
    plain = route(145.0, 5 * bench.GiB, 15_000_000_000)
    assert plain["seconds"] == 146.0 and plain["peak_rss"] == 5 * bench.GiB and plain["written"] == 15_000_000_001
    ours = route(515.0, int(15.3 * bench.GiB), 25_600_000_000)  # main before issue 10: every target missed
    got = {c.what: (round(c.value, 2), c.met) for c in bench.checks(plain, ours)}
    assert got == {
        "wall (ours/plain)": (3.53, False),
        "peak tree RSS (ours)": (15.3, False),
        "peak tree RSS (ours/plain)": (3.06, False),
        "written (ours/plain)": (1.71, False),
    }
    lean = route(100.0, 3 * bench.GiB, 16_000_000_000)
    assert all(c.met for c in bench.checks(plain, lean))
    # 4 GiB is absolute: a plain route of 6 GiB allows 0.75x = 4.5 GiB, the bound still says no
    heavy_plain = route(145.0, 6 * bench.GiB, 15_000_000_000)
    assert [c.met for c in bench.checks(heavy_plain, route(100.0, int(4.2 * bench.GiB), 1))] == [
        True,
        False,
        True,
        True,
    ]
    text = bench.table({"plain": plain, "ours": ours})
    assert "TOTAL" in text and "15.30 GiB" in text
    assert "MISSED" in bench.checks(plain, ours)[0].line() and " met" in bench.checks(plain, lean)[0].line()


def test_verify_summary_reads_tokens_gates_and_imatrix():
    report = {
        "passed": True,
        "files": [
            {
                "path": "/x/m.f16.gguf",
                "quant": "f16",
                "measures": {"positions": 2048, "nmse": 1.3e-6},
                "gates": [{"name": "nmse", "value": 1.3e-6, "threshold": 1e-4, "passed": True}],
            },
            {
                "path": "m.q4_k_m.gguf",
                "quant": "q4_k_m",
                "measures": {"scored_tokens": 4096, "kld": 0.041},
                "gates": [{"name": "kld", "value": 0.041, "threshold": 0.05, "passed": True}],
            },
        ],
    }
    text = "\n".join(bench.verify_summary(report))
    assert "m.f16.gguf [f16]: scored tokens 2,048" in text and "scored tokens 4,096" in text
    assert "gate 0.05" in text and "imatrix: not in verify.json" in text
    report["imatrix"] = {"q4_k_m_kld_ratio": 0.8}
    assert "imatrix: imatrix.q4_k_m_kld_ratio = 0.800" in "\n".join(bench.verify_summary(report))


def memory_cgroup(name: str, limit: int):
    """A bench MemoryLimit, or a skip where this machine cannot make one (not root, no memory controller)."""
    try:
        return bench.MemoryLimit(name, limit)
    except SystemExit as e:
        pytest.skip(str(e))


ALLOCATE = "import sys, time; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"


def test_a_stage_under_a_memory_limit_completes_below_it_and_is_killed_above_it(tmp_path):
    cgroup = memory_cgroup(f"bench-export-test-{os.getpid()}", 160 * MiB)
    try:
        cmd = [sys.executable, "-c", ALLOCATE]
        fits = bench.run_stage("t", "fits", [*cmd, "64"], log_path=tmp_path / "fits.log", cgroup=cgroup)
        assert fits.returncode == 0 and fits.oom_kills == 0
        assert 64 * MiB <= fits.peak_cgroup <= 160 * MiB  # the child's pages were charged to the cgroup
        over = bench.run_stage("t", "over", [*cmd, "400"], log_path=tmp_path / "over.log", cgroup=cgroup, check=False)
        assert over.returncode == -9 and over.oom_kills >= 1  # SIGKILL by the kernel's OOM killer
        total = bench.route_total([fits, over], 0) | {"memory_limit": 160 * MiB}
        assert not total["completed"]
        assert "did NOT complete" in bench.route_notes("t", total)[0]
        assert "out of memory" in bench.route_notes("t", total)[1]
    finally:
        cgroup.remove()
