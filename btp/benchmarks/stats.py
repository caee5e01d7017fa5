"""Timing statistics and the measuring loop shared by every benchmark (torch-free, numpy only).

Rules (trtexec / mmdeploy style): a warm-up phase that is never recorded, then a timed phase of
at least ``min_iters`` calls and at least ``duration_s`` seconds (capped by ``max_iters``);
percentiles by numpy's linear interpolation, so ``p50 <= p90 <= p99`` always holds.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Stats:
    """Summary of one series of timings, all in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(samples_ms: Sequence[float]) -> Stats:
    """Percentiles, mean, min, max of ``samples_ms`` (at least one sample)."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"summarize: need a non-empty 1-D series of timings, got shape {arr.shape}")
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return Stats(p50=float(p50), p90=float(p90), p99=float(p99), mean=float(arr.mean()),
                 min=float(arr.min()), max=float(arr.max()), n=int(arr.size))


def measure(fn: Callable[[], object], *, warmup_s: float = 0.2, duration_s: float = 3.0,
            min_iters: int = 10, max_iters: int = 10_000, min_warmup_iters: int = 1,
            on_result: Callable[[object, float], None] | None = None) -> list[float]:
    """Call ``fn`` repeatedly: warm-up (not recorded), then timed calls; returns ms per call.

    ``on_result(result, ms)`` sees every timed call's return value (e.g. to collect the
    per-stage timings a pipeline reports alongside the wall-clock end-to-end time).
    """
    t_end = time.perf_counter() + warmup_s
    done = 0
    while done < min_warmup_iters or time.perf_counter() < t_end:
        fn()
        done += 1
    samples: list[float] = []
    t_end = time.perf_counter() + duration_s
    while len(samples) < max_iters and (len(samples) < min_iters or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        result = fn()
        ms = (time.perf_counter() - t0) * 1e3
        samples.append(ms)
        if on_result is not None:
            on_result(result, ms)
    return samples


def median_ms(fn: Callable[[], object], *, repeat: int = 7, warmup: int = 1,
              max_s: float | None = None) -> tuple[float, object]:
    """Median wall time of ``repeat`` calls after ``warmup`` calls; returns (ms, last result).

    ``max_s`` stops early (after at least one timed call) when the series would take too long.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    samples = []
    t_start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if max_s is not None and time.perf_counter() - t_start > max_s:
            break
    return float(np.median(samples)), result
