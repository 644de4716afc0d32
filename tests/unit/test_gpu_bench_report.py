"""bench/gpu_train.py's own arithmetic, checked on made-up inputs: the CUDA allocator trace replay behind
--memory-profile (peak, and what was alive at it, by allocating code) and --profile's GPU-busy union."""

from __future__ import annotations

import pytest

from tests.conftest import bench_module


@pytest.fixture(scope="module")
def bench():
    return bench_module("gpu_train")


MiB = 2**20
MLP = [{"filename": "/x/site-packages/transformers/models/gemma2/modeling_gemma2.py", "line": 81, "name": "forward"}]
TORCH = [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 10, "name": "linear"}]
HEAD = [{"filename": "/x/site-packages/trl/trainer/utils.py", "line": 900, "name": "forward"}]


def alloc(addr, mib, frames):
    return {"action": "alloc", "addr": addr, "size": mib * MiB, "frames": frames}


def free(addr, mib):
    return {"action": "free_completed", "addr": addr, "size": mib * MiB, "frames": []}


def test_peak_report_replays_the_trace_and_groups_what_was_alive_at_the_peak(bench):
    trace = [
        alloc(1, 100, TORCH + MLP),  # torch frames are skipped: the MLP line allocated it
        alloc(2, 20, HEAD),  # 1144 MiB: not yet the peak
        {"action": "free_requested", "addr": 2, "size": 20 * MiB, "frames": []},  # not freed yet
        free(2, 20),
        alloc(3, 30, MLP),  # peak: 1024 + 100 + 30 MiB; 1 and 3 alive
        free(1, 100),
        free(9, 200),  # a block from before the trace: below the baseline from here on
        alloc(4, 250, HEAD),  # 1024 + 30 - 200 + 250 = 1104 MiB: under the peak
    ]
    text = bench.peak_report(trace, baseline=1024 * MiB, steps=3)
    head, *rows = text.splitlines()
    assert f"peak {(1024 + 130) / 1024:.2f} GiB allocated; 1.00 GiB were allocated before them" in head
    assert f"{130 / 1024:.2f} GiB allocated within them and alive at the peak" in head
    assert len(rows) == 1 and "130.0 MiB" in rows[0] and "2 x  modeling_gemma2.py:81 forward" in rows[0]


def test_a_trace_that_never_rises_reports_the_baseline_and_nothing_alive(bench):
    text = bench.peak_report([free(7, 10)], baseline=2 * 2**30, steps=1)
    assert text.splitlines() == [
        "memory over 1 steps: peak 2.00 GiB allocated; 2.00 GiB were allocated before them (weights, optimizer "
        "state, what lives between steps); 0.00 GiB allocated within them and alive at the peak:"
    ]


def test_allocation_site_names_the_model_source_behind_compiled_code(bench):
    generated = {
        "filename": "/w/inductor/ab/cabc.py",
        "line": 412,
        "name": "call",
        "fx_original_trace": 'File "/x/transformers/models/gemma2/modeling_gemma2.py", line 81, in forward\n'
        "    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n",
    }
    assert bench.allocation_site([*TORCH, generated, *MLP]) == "compiled: modeling_gemma2.py:81 forward"
    assert bench.allocation_site([{**generated, "fx_original_trace": ""}]) == "cabc.py:412 call"
    assert bench.allocation_site(TORCH).startswith("no Python frame outside torch")


def test_gpu_busy_is_the_union_of_kernel_intervals(bench):
    kernels = [("sm90_xmma_gemm", 0.0, 10.0), ("triton_poi_fused_add", 5.0, 20.0), ("flex_attention", 30.0, 40.0)]
    head, *kinds = bench.profile_summary(kernels, wall=50e-6, steps=1).splitlines()
    assert "GPU busy 0.000 s (60%)" in head and "3 kernels a step" in head  # 0-20 and 30-40 us: overlap counted once
    assert [k.split()[0] for k in kinds] == ["fused", "matmul", "attention"]
