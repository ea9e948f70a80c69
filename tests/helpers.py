"""Shared test helpers: tiny image folders on disk, and running the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_image_folder(root: Path, *, per_class=(12, 4), classes=3, size=16, seed=0) -> Path:
    """train/<class>/*.png and test/<class>/*.png with class-dependent brightness."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 60 * c, 15, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def tar_folder(folder: Path, archive: Path, top: str = "") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(Path(top) / path.relative_to(folder)))
    return archive


def run_cli(*args: str, devices: int = 1, timeout: float = 300, env_extra=None):
    """Runs `python -m qarjax ARGS` with `devices` fake CPU devices; returns CompletedProcess."""
    return run_script("-m", "qarjax", *args, devices=devices, timeout=timeout, env_extra=env_extra)


def run_script(*args: str, devices: int = 1, timeout: float = 300, env_extra=None):
    """Runs `python ARGS` in the repo with `devices` fake CPU devices; returns CompletedProcess."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
