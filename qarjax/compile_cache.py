"""A persistent XLA compilation cache, so the second process that runs a model compiles nothing.

Every ``qarjax`` command (train, quantize, tune, eval, run) and every study invocation is a
new process, and XLA compiles its programs anew in each: a model's initializers, its train,
evaluation and tuning steps (seconds on a CPU; experiments/bench_startup.py measures how many).
`enable()` points JAX's persistent compilation cache at a folder, so a program compiled once
is read back in the next process. The CLI and the experiments call it; in a notebook or your
own script call ``qarjax.enable_compilation_cache()``: programs compiled after it are cached.

- The folder: ``<base>/<host_key()>``, the base ``$QARJAX_COMPILATION_CACHE`` when set to a
  path, else ``$XDG_CACHE_HOME/qarjax/xla`` (``~/.cache/qarjax/xla``): one subfolder per host
  CPU (model and instruction-set flags), since XLA:CPU compiles for the CPU it runs on and a
  home folder shared by a cluster's machines must not hand one's programs to another (JAX's
  key names the platform, ``cpu``, not the CPU). Made readable by its owner only: whoever can
  write it can run code in your processes.
- Off with ``QARJAX_COMPILATION_CACHE=0``, or where JAX's own cache is switched off
  (``JAX_ENABLE_COMPILATION_CACHE=false``). JAX's settings win: a folder already configured
  (``JAX_COMPILATION_CACHE_DIR``) is left as it is, and so is a minimum compile time you set
  (qarjax caches every program, the small ones too: a model's initializers are tens of 0.1 s
  compilations).
- Its size: when the entries of all the base's CPU subfolders have grown past `MAX_BYTES`
  (``$QARJAX_COMPILATION_CACHE_MB`` megabytes), those used longest ago are removed at the next
  `enable` until they fill half of it; only JAX's entries are touched (JAX's own limit,
  ``jax_compilation_cache_max_size``, replaces this where you set it).
- Damage: JAX writes an entry in place and never rewrites one that exists, so an entry cut
  short (a process killed while writing it, a full disk) would be compiled again in every
  later process; `enable` removes the entries written since its last look that do not
  decompress.
- XLA:CPU on some CPUs rejects every program it reads back (it counts LLVM tuning preferences
  such as ``+prefer-no-gather`` among the features the CPU must have): `enable` compiles,
  saves and loads one tiny program the first time it sees a CPU and jaxlib, and leaves the
  cache off on that CPU if the load fails, remembering the answer in the folder.
- A folder that cannot be written (a read-only or missing home) means no cache, not an error.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import zlib
from pathlib import Path

from qarjax.errors import ConfigError
from qarjax.files import make_writable_folder

ENV = "QARJAX_COMPILATION_CACHE"
ENV_MB = "QARJAX_COMPILATION_CACHE_MB"
MAX_BYTES = 2 << 30  # 2 GiB: thousands of models' programs (each model's: under 1 MB)
_HOST_FOLDER = re.compile(r"[A-Za-z0-9_]+-[0-9a-f]{16}")  # what host_key() names
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@functools.cache
def host_key() -> str:
    """A short name for this host's CPU: its architecture, model and instruction-set flags.

    >>> bool(_HOST_FOLDER.fullmatch(host_key()))
    True
    """
    cpu = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        picked = [line for line in info if line.startswith(("model name", "flags", "Features"))]
        cpu += "".join(sorted(set(picked)))
    except OSError:
        cpu += platform.processor()
    arch = re.sub(r"[^A-Za-z0-9_]", "_", platform.machine()) or "cpu"
    return f"{arch}-{hashlib.sha256(cpu.encode()).hexdigest()[:16]}"


def default_dir() -> Path:
    """The base folder when ``$QARJAX_COMPILATION_CACHE`` names none (see the module
    docstring); raises RuntimeError where the process has no home folder."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qarjax" / "xla"


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache for this process; returns its folder.

    Programs compiled after the call are cached (call it first thing; a process keeps the
    first folder JAX used). In a multi-process run call it after
    ``jax.distributed.initialize``: the first time it meets a CPU it compiles a tiny program,
    which starts JAX's backend. None where it is off or cannot be used (see the module
    docstring); JAX's folder where one is configured already. `directory` is used as given,
    without the per-CPU subfolder.
    """
    import jax

    max_bytes = _max_bytes()  # a bad setting is an error wherever the cache is
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    setting = os.environ.get(ENV, "")
    if (directory is None and setting == "0") or not jax.config.jax_enable_compilation_cache:
        return None
    try:
        if directory is not None:
            path, folders = Path(directory).expanduser(), None
        else:
            base = Path(setting).expanduser() if setting else default_dir()
            path = base / host_key()
            folders = [p for p in base.glob("*") if _HOST_FOLDER.fullmatch(p.name)]
        make_writable_folder(path, mode=0o700)
    except (OSError, RuntimeError, KeyError):  # RuntimeError, KeyError: no home folder
        return None
    if not reads_back(path):
        return None
    remove_damaged(path)
    if jax.config.jax_compilation_cache_max_size == -1:  # else JAX evicts itself
        prune(folders if folders is not None else [path], max_bytes)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def reads_back(path: Path) -> bool:
    """Whether this CPU's XLA loads a program it saved (see the module docstring): tried once
    per CPU and jaxlib, the answer kept in `path`."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import serialize_executable as executables
    from jaxlib import version

    marker = f".reads-back-{host_key()}-jaxlib{version.__version__}-"
    for answer in (True, False):
        if (path / f"{marker}{answer}").exists():
            return answer
    try:
        compiled = jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(3)).compile()
        loaded = executables.deserialize_and_load(
            *executables.serialize(compiled), execution_devices=jax.devices()[:1]
        )
        answer = bool((loaded(jnp.ones(3)) == 3).all())
    except Exception:  # noqa: BLE001 (whatever the loader raises, the cache stays off)
        answer = False
    try:
        (path / f"{marker}{answer}").touch()
    except OSError:
        pass
    return answer


def _intact(data: bytes) -> bool:
    """Whether a cache entry decompresses (JAX writes zstd where it can import it, else zlib);
    True where this Python cannot tell."""
    try:
        if data[:4] != _ZSTD_MAGIC:
            zlib.decompress(data)
            return True
        try:
            from compression import zstd  # Python 3.14

            zstd.decompress(data)
        except ImportError:
            import zstandard

            zstandard.ZstdDecompressor().decompress(data)
        return True
    except ImportError:
        return True
    except Exception:  # noqa: BLE001 (zlib.error, zstd's errors: cut short or garbled)
        return False


def remove_damaged(path: Path) -> int:
    """Removes the entries of `path` written since the last call that do not decompress;
    returns how many."""
    seen = path / ".qarjax-checked"
    since = seen.stat().st_mtime if seen.exists() else 0.0
    removed = 0
    for entry in path.glob("*-cache"):
        try:
            if entry.stat().st_mtime >= since and not _intact(entry.read_bytes()):
                entry.unlink()
                removed += 1
        except OSError:
            continue
    try:
        seen.touch()
    except OSError:
        pass
    return removed


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


def prune(folders: list[Path], max_bytes: int) -> int:
    """Removes the cache entries of `folders` used longest ago (by access, else modification
    time) until they fill half of `max_bytes`, if they fill more than `max_bytes`; returns how
    many it removed. Only JAX's entries (``*-cache`` files, with their ``*-atime`` records)
    are counted and removed, whatever else the folders hold; an entry another process removes
    first is skipped."""
    entries = []
    for entry in (e for folder in folders for e in folder.glob("*-cache")):
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
