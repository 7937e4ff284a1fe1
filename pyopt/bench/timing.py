"""Timing and the machine's own limits, measured in the benchmark's process.

Method: a warm-up call, then repetitions until ``min_time`` seconds have been
measured (at least ``min_reps``); the median and interquartile range of the
per-call times are reported with the repetition count. Ratios between
implementations are only meaningful inside one run: this machine's absolute
speed drifts with whatever else shares it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median: float   # seconds per call
    q1: float
    q3: float
    reps: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def fields(self) -> dict:
        """The record fields every suite reports (results.json schema)."""
        return dict(median_ms=self.median * 1e3, q1_ms=self.q1 * 1e3, q3_ms=self.q3 * 1e3,
                    iqr_ms=self.iqr * 1e3, reps=self.reps)


def measure(fn, *, min_time=0.5, min_reps=5, max_reps=10_000, warmup=1, sync=None) -> Timing:
    """Time ``fn()``; ``sync`` (e.g. torch.cuda.synchronize) runs after each call."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    total = 0.0
    while (total < min_time or len(times) < min_reps) and len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    times.sort()
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[0], q[2], len(times))


def interleaved(fns: dict, *, min_time=0.5, min_reps=5, max_reps=10_000, warmup=1,
                sync=None, cuda=False, burst=1) -> dict:
    """Time several calls round-robin: {name: Timing}.

    On a shared machine the available bandwidth drifts by 2x within seconds;
    timing the implementations (and the bandwidth reference) in alternation
    makes each ratio compare like with like. A call stops being repeated once
    it has ``min_time`` seconds and ``min_reps`` repetitions.

    ``burst > 1`` times cache-resident work: each turn makes one untimed call
    to bring the call's data back into cache, then times ``burst`` calls in a
    row, so the other calls' traffic does not turn it into a DRAM benchmark.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync:
        sync()
    times = {k: [] for k in fns}
    totals = dict.fromkeys(fns, 0.0)
    active = list(fns)
    while active:
        for k in list(active):
            if burst > 1:
                fns[k]()
            for _ in range(burst):
                dt = _time_one(fns[k], sync, cuda)
                times[k].append(dt)
                totals[k] += dt
            n = len(times[k])
            if (totals[k] >= min_time and n >= min_reps) or n >= max_reps:
                active.remove(k)
    return {k: _summarize(v) for k, v in times.items()}


def _time_one(fn, sync, cuda) -> float:
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def _summarize(times) -> Timing:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[0], q[2], len(times))


def measure_cuda(fn, *, min_time=0.5, min_reps=5, warmup=3) -> Timing:
    """Time a CUDA call with events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, total = [], 0.0
    while total < min_time or len(times) < min_reps:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        dt = a.elapsed_time(b) / 1e3
        times.append(dt)
        total += dt
    times.sort()
    return _summarize(times)


def bandwidth_limits(device="cpu", nbytes=256 << 20, min_time=0.5) -> dict:
    """Same-run copy, triad and in-place read-modify-write bandwidth in GB/s,
    and fp32 GEMM GFLOP/s (2048^3, 2 flops per multiply-add).

    Byte models: copy 8 B/elem (y = x), triad 12 B/elem (a = b + s*c),
    RMW 12 B/elem (y += s*x: read x and y, write y in place). Copy and triad
    read lower than RMW on CPUs that write-allocate their output line.
    """
    n = nbytes // 4
    x = torch.rand(n, device=device)
    y = torch.rand(n, device=device)
    z = torch.empty(n, device=device)
    timer = measure_cuda if device != "cpu" else measure
    copy = timer(lambda: y.copy_(x), min_time=min_time)
    triad = timer(lambda: torch.add(x, y, alpha=0.5, out=z), min_time=min_time)
    rmw = timer(lambda: y.add_(x, alpha=1e-9), min_time=min_time)
    del x, y, z
    m = 2048 if nbytes >= 64 << 20 else 256
    a = torch.rand(m, m, device=device)
    b = torch.rand(m, m, device=device)
    gemm = timer(lambda: torch.mm(a, b), min_time=min_time)
    return {"copy_gbps": 8 * n / copy.median / 1e9, "triad_gbps": 12 * n / triad.median / 1e9,
            "rmw_gbps": 12 * n / rmw.median / 1e9, "gemm_gflops": 2 * m ** 3 / gemm.median / 1e9,
            "array_bytes": nbytes}
