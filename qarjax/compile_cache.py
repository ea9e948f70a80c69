"""A persistent XLA compilation cache, so the second process that runs a model compiles nothing.

Every ``qarjax`` command (train, quantize, tune, eval, run) and every study invocation is a
new process, and XLA compiles its programs anew in each: a model's initializers, its train,
evaluation and tuning steps (seconds on a CPU; experiments/bench_startup.py measures how many).
`enable()` points JAX's persistent compilation cache at a folder, so a program compiled once
is read back in the next process. The CLI and the experiments call it; in a notebook or your
own script call ``qarjax.enable_compilation_cache()`` before the first compilation.

- The folder: ``$QARJAX_COMPILATION_CACHE`` when set to a path, else
  ``$XDG_CACHE_HOME/qarjax/xla`` (``~/.cache/qarjax/xla``), and inside it one subfolder per
  host CPU and jaxlib (`host_key`): XLA:CPU compiles for the instruction set of the CPU it runs
  on, and a home folder shared by a cluster's different machines must not hand one's code to
  another.
- ``QARJAX_COMPILATION_CACHE=0`` switches it off. JAX's own setting wins: where
  ``JAX_COMPILATION_CACHE_DIR`` (or ``jax.config.jax_compilation_cache_dir``) is set already,
  `enable` leaves it as it is.
- Its size: when its entries have grown past `MAX_BYTES` (``$QARJAX_COMPILATION_CACHE_MB``
  megabytes), those used longest ago are removed at the next `enable` until they fill half of
  it (only JAX's entries: nothing else in the folder is touched).
- A folder that cannot be written (a read-only home) means no cache, not an error; a damaged
  entry (a process killed while writing it) is compiled again (JAX warns and goes on).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

from qarjax.errors import ConfigError

ENV = "QARJAX_COMPILATION_CACHE"
ENV_MB = "QARJAX_COMPILATION_CACHE_MB"
MAX_BYTES = 2 << 30  # 2 GiB: thousands of models' programs (each model's: under 1 MB)


def host_key() -> str:
    """A short name for this host's CPU (model and instruction-set flags) and jaxlib version.

    >>> from jaxlib import version
    >>> host_key().startswith(f"{platform.machine()}-jaxlib{version.__version__}-")
    True
    """
    from jaxlib import version

    cpu = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        picked = [line for line in info if line.startswith(("model name", "flags", "Features"))]
        cpu += "".join(sorted(set(picked)))
    except OSError:
        cpu += platform.processor()
    digest = hashlib.sha256(f"{cpu}|{version.__version__}".encode()).hexdigest()[:16]
    return f"{platform.machine()}-jaxlib{version.__version__}-{digest}"


def default_dir() -> Path:
    """The folder `enable()` uses when not told one (see the module docstring)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qarjax" / "xla"


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache for this process; returns its folder.

    Call it before the process compiles anything (JAX sets its cache up at the first
    compilation). None where it is off (``QARJAX_COMPILATION_CACHE=0``) or the folder cannot
    be written; JAX's folder where one is configured already. `directory` (or the
    environment's path) is used as given, without the per-host subfolder.
    """
    import jax

    max_bytes = _max_bytes()  # a bad setting is an error wherever the cache is
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    setting = os.environ.get(ENV, "")
    if directory is None and setting == "0":
        return None
    path = Path(directory or setting or default_dir() / host_key())
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return None
    prune(path, max_bytes)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program, the small ones too: a model's initializers are tens of 0.1 s compiles.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _max_bytes() -> int:
    mb = os.environ.get(ENV_MB, "")
    if not mb:
        return MAX_BYTES
    try:
        value = float(mb)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError(f"{ENV_MB} must be a positive number of megabytes, got {mb!r}")
    return int(value * (1 << 20))


def prune(path: Path, max_bytes: int) -> int:
    """Removes the cache entries of `path` used longest ago (by access, else modification
    time) until they fill half of `max_bytes`, if they fill more than `max_bytes`; returns how
    many it removed. Only JAX's entries (``*-cache`` files, with their ``*-atime`` records)
    are counted and removed, whatever else the folder holds; an entry another process removes
    first is skipped."""
    entries = []
    for entry in path.glob("*-cache"):
        try:
            st = entry.stat()
        except OSError:
            continue
        entries.append((max(st.st_atime, st.st_mtime), st.st_size, entry))
    total = sum(size for _, size, _ in entries)
    if total <= max_bytes:
        return 0
    removed = 0
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes // 2:
            break
        try:
            entry.unlink()
            entry.with_name(entry.name.removesuffix("-cache") + "-atime").unlink(missing_ok=True)
        except OSError:
            continue
        total -= size
        removed += 1
    return removed
