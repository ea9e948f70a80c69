"""Shared benchmark helpers: synthetic CIFAR-shaped data and timing of train epochs."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from qarjax.config import default_config
from qarjax.data import Dataset


def synthetic_cifar(n_train: int, n_test: int = 512, seed: int = 0) -> Dataset:
    """Random uint8 images of CIFAR's shape: the step's cost does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = lambda n: rng.integers(0, 10, n).astype(np.int32)
    return Dataset("synthetic", images(n_train), labels(n_train), images(n_test), labels(n_test),
                   tuple(str(i) for i in range(10)))  # fmt: skip


def bench_config(model: str, batch_size: int, dtype: str):
    """A one-epoch, quiet config for timing `model`."""
    config = default_config()
    config.model, config.batch_size, config.compute_dtype = model, batch_size, dtype
    config.progress, config.num_epochs = False, 1
    return config


def time_epoch(trainer, state, epoch: int):
    """Runs one (short) epoch and returns (state, seconds), fully synchronized."""
    jax.block_until_ready(state.params)
    began = time.perf_counter()
    state, _ = trainer.train_epoch(state, epoch)
    jax.block_until_ready(state.params)
    return state, time.perf_counter() - began


def cpu_info() -> dict:
    """The host CPU: its model name, cores and /proc/cpuinfo's clock (a VM may report its
    nominal clock, or none), and whether it has AVX-512 and AMX."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count() or 1,
            "mhz": 0.0, "flags": []}  # fmt: skip
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz" and not info["mhz"]:
                info["mhz"] = float(value)
            elif key.strip() == "model name":
                info["cpu"] = value.strip()
            elif key.strip() == "flags" and not info["flags"]:
                have = set(value.split())
                info["flags"] = [
                    f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in have
                ]
    except OSError:
        pass
    return info


def device_name() -> str:
    """The device the figures come from: on a CPU, which CPU (machines here differ)."""
    d = jax.devices()[0]
    name = f"{jax.device_count()} x {d.device_kind} ({d.platform})"
    if d.platform == "cpu":
        cpu = cpu_info()
        name += f": {cpu['cpu']}, {cpu['cores']} cores, {' '.join(cpu['flags'])}"
    return name


def cpu_sample() -> tuple[float, float | None, float]:
    """(wall seconds, CPU seconds the whole machine was busy or None off Linux, CPU seconds of
    this process with all its threads and its finished children, a benchmark's own work):
    two samples give `others_cpu_share`."""
    busy = None
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:9]]  # user .. steal
        idle = ticks[3] + ticks[4]  # idle, iowait
        busy = (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return time.monotonic(), busy, sum(r.ru_utime + r.ru_stime for r in own)


def others_cpu_share(start, end, cores: int | None = None) -> float | None:
    """The fraction of the machine's cores that other processes (and a hypervisor's steal)
    used between two `cpu_sample`s: near 0 on a quiet machine. /proc/stat counts in ticks
    (10 ms), so over a short interval the count can pass the cores' time: at most 1.

    >>> others_cpu_share((0.0, 100.0, 5.0), (10.0, 115.0, 15.0), cores=2)  # 5 of 20 core-s
    0.25
    >>> others_cpu_share((0.0, 100.0, 5.0), (0.01, 100.05, 5.0), cores=2)  # a tick too many
    1.0
    """
    if start[1] is None or end[1] is None or end[0] <= start[0]:
        return None
    cores = cores or os.cpu_count() or 1
    others = (end[1] - start[1]) - (end[2] - start[2])
    return round(min(1.0, max(0.0, others) / ((end[0] - start[0]) * cores)), 3)


_STARTED = cpu_sample()  # a benchmark imports this module first


def write_json(path: str | None, payload: dict) -> None:
    """Writes `payload` with the share of the cores other processes used since the benchmark
    started (its figures' noise: absolute times grow with it, ratios from one interleaved run
    much less), and says so when that share was not small."""
    share = others_cpu_share(_STARTED, cpu_sample())
    if share is not None and share > 0.05:
        print(f"note: other processes used {share:.0%} of the cores during this run; its "
              "absolute times are inflated, its ratios (one interleaved run) less so")  # fmt: skip
    payload = {**payload, "others_cpu_share": share}
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


median = statistics.median
