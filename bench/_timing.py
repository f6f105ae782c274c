"""Timing and the machine header shared by the bench scripts.

Every table starts with the machine (cores, CPU model, memory), the TensorFlow version and its
thread settings, because a ratio means little without them. Times are medians of several
repetitions after warm-up calls (which also absorb tracing), measured in one process.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import tensorflow as tf


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    """CPU feature flags (Linux); used to say whether bfloat16 has hardware support."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_header(title: str) -> str:
    """Lines naming the benchmark, machine, TF version and thread settings."""
    bf16 = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx"))
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")
    lines = [
        title,
        f"machine: {os.cpu_count()} cores (nproc), {cpu_model()}, "
        f"bf16 units: {', '.join(bf16) or 'none'}",
        f"TensorFlow {tf.__version__}; intra-op threads {intra or 'auto'}, inter-op threads "
        f"{inter or 'auto'}, oneDNN {onednn}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "times: median of repetitions after warm-up, all in this process; a shared or busy "
        "machine makes them noisy",
    ]
    return "\n".join(lines)


def median_seconds(fn: Callable[[], object], repetitions: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` (its result is read back to the host to finish the work)."""
    for _ in range(warmup):
        _block(fn())
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _block(result: object) -> None:
    """Waits for the computation: reads one element of every tensor in the result."""
    for value in tf.nest.flatten(result):
        if isinstance(value, (tf.Tensor, tf.Variable)):
            tf.reshape(value, [-1])[:1].numpy()
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            pass  # numpy arrays are already on the host


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain fixed-width table (floats with 3 significant decimals)."""
    def text(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    cells = [[text(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) if i else h.ljust(w)
                     for i, (h, w) in enumerate(zip(headers, widths)))]
    out.append("-" * len(out[0]))
    for row in cells:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(out)


def interleaved_seconds(fns: dict[str, Callable[[], object]], repetitions: int = 5,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each ``fn`` over ``repetitions`` rounds, the fns interleaved per round.

    On a shared machine the load drifts within seconds; timing every contender once per round
    exposes them to the same load, so per-round ratios are steadier than ratios of medians
    taken minutes apart.
    """
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repetitions):
        for name, fn in fns.items():
            start = time.perf_counter()
            _block(fn())
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (see ``interleaved_seconds``)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))
