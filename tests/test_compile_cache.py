"""The persistent compilation cache: a second process reads its programs back; JAX's own
settings win; off, unwritable, over-full, damaged and unreadable-on-this-CPU caches are
handled."""

import json
import os
import stat
import subprocess
import sys
import time
import zlib

import pytest
from helpers import REPO

from qarjax import cli, compile_cache

PROGRAM = """
import sys
import jax, jax.numpy as jnp
from jax import monitoring
from qarjax import compile_cache

hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name))
folder = compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.arange(12.0).reshape(3, 4) / 10)
print(folder, hits.count("/jax/compilation_cache/cache_hits"), float(y))
"""


def run(*argv, **env_changes):
    """PROGRAM in a fresh process without the suite's cache settings: (folder, hits, value)."""
    ours = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "QARJAX_COMP")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROGRAM, *map(str, argv)], env=env,
                         capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    folder, hits, value = out.stdout.split()
    return folder, int(hits), float(value)


PLACES = """
import json, os, sys
import jax
from qarjax import compile_cache

found = {}
for name, env, directory in json.loads(sys.argv[1]):
    saved = dict(os.environ)
    os.environ.update(env)
    jax.config.update("jax_enable_compilation_cache", env.get("JAX_ENABLE", "1") == "1")
    found[name] = str(compile_cache.enable(directory))
    os.environ.clear(), os.environ.update(saved)
    jax.config.update("jax_compilation_cache_dir", None)  # the next case starts afresh
print(json.dumps(found))
"""


def test_the_second_process_reads_the_first_ones_programs_back(tmp_path):
    first = run(tmp_path / "cache")
    assert first[:2] == (str(tmp_path / "cache"), 0) and os.listdir(tmp_path / "cache")
    second = run(tmp_path / "cache")
    assert second[1] >= 1 and second[2] == first[2]  # read back, the same result


def test_where_it_goes_and_where_it_is_off(tmp_path):
    (tmp_path / "file").write_text("")
    cases = [  # (name, environment, directory)
        ("default", {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, None),
        ("base", {"QARJAX_COMPILATION_CACHE": str(tmp_path / "env")}, None),
        ("off", {"QARJAX_COMPILATION_CACHE": "0"}, None),
        ("jax off", {"JAX_ENABLE": "0"}, str(tmp_path / "a")),
        ("unwritable", {}, str(tmp_path / "file" / "cache")),
        ("no home", {"HOME": str(tmp_path / "file" / "home"), "XDG_CACHE_HOME": ""}, None),
    ]  # fmt: skip
    ours = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "QARJAX_COMP")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    out = subprocess.run([sys.executable, "-c", PLACES, json.dumps(cases)], env=env,
                         capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # a subfolder per host CPU under the base, its owner's only
    assert found["default"] == str(tmp_path / "xdg" / "qarjax" / "xla" / compile_cache.host_key())
    assert stat.S_IMODE(os.stat(found["default"]).st_mode) == 0o700
    assert found["base"] == str(tmp_path / "env" / compile_cache.host_key())
    # off, or cannot be made: no cache, no error
    assert [found[k] for k in ("off", "jax off", "unwritable", "no home")] == ["None"] * 4


def test_jaxs_own_settings_win(tmp_path):
    jax_dir = str(tmp_path / "jax")
    assert run(tmp_path / "mine", JAX_COMPILATION_CACHE_DIR=jax_dir)[0] == jax_dir
    assert not (tmp_path / "mine").exists()
    # a minimum compile time you set (this program compiles in less)
    run(tmp_path / "slow", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="60")
    assert not list((tmp_path / "slow").glob("*-cache"))


def entries(folder, ages_hours, size=100):
    now = time.time()
    for i, age in enumerate(ages_hours):
        path = folder / f"jit_f-{i}-cache"
        path.write_bytes(b"x" * size)
        (folder / f"jit_f-{i}-atime").write_bytes(b"t")
        os.utime(path, (now - 3600 * age, now - 3600 * age))


def test_an_over_full_cache_loses_its_least_recently_used_entries(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    entries(a, range(0, 10, 2))  # entry i of a used 2i hours ago, of b 2i + 1
    entries(b, range(1, 10, 2))
    (a / "notes.txt").write_bytes(b"y" * 5000)  # not the cache's: never counted or removed
    os.utime(a / "notes.txt", (0, 0))
    assert compile_cache.prune([a, b], 1000) == 0  # at the limit: kept
    assert compile_cache.prune([a, b], 900) == 6  # over it, summed over both: down to half
    kept = lambda f: sorted(p.name for p in f.iterdir())  # noqa: E731
    assert kept(a) == ["jit_f-0-atime", "jit_f-0-cache", "jit_f-1-atime", "jit_f-1-cache",
                       "notes.txt"]  # fmt: skip
    assert kept(b) == ["jit_f-0-atime", "jit_f-0-cache", "jit_f-1-atime", "jit_f-1-cache"]


def test_enable_prunes_the_bases_cpu_folders_and_only_those(tmp_path):
    other_cpu = tmp_path / "x86_64-0123456789abcdef"
    not_ours = tmp_path / "photos"
    for folder in (other_cpu, not_ours):
        folder.mkdir()
        entries(folder, [100] * 8, size=100_000)  # 800 kB each, old
    run(QARJAX_COMPILATION_CACHE=str(tmp_path), QARJAX_COMPILATION_CACHE_MB="0.5")
    assert len(list(other_cpu.glob("*-cache"))) == 2  # down to 250 kB
    assert len(list(not_ours.glob("*-cache"))) == 8


def test_damaged_entries_are_removed_and_a_cpu_that_cannot_read_back_gets_none(
    tmp_path, monkeypatch
):
    good, cut = zlib.compress(b"program" * 100), zlib.compress(b"program" * 100)[:20]
    (tmp_path / "jit_ok-cache").write_bytes(good)
    (tmp_path / "jit_cut-cache").write_bytes(cut)
    assert compile_cache.remove_damaged(tmp_path) == 1
    assert [p.name for p in tmp_path.glob("*-cache")] == ["jit_ok-cache"]
    (tmp_path / "jit_old_cut-cache").write_bytes(cut)
    os.utime(tmp_path / "jit_old_cut-cache", (0, 0))  # before the last look: not read again
    assert compile_cache.remove_damaged(tmp_path) == 0

    from jax.experimental import serialize_executable

    (tmp_path / "fresh").mkdir()
    assert compile_cache.reads_back(tmp_path / "fresh")  # this CPU's XLA loads its programs

    def rejected(*args, **kwargs):
        raise RuntimeError("Target machine feature +prefer-no-gather is not supported")

    monkeypatch.setattr(serialize_executable, "deserialize_and_load", rejected)
    assert not compile_cache.reads_back(tmp_path)
    monkeypatch.setattr(serialize_executable, "serialize", pytest.fail)
    assert not compile_cache.reads_back(tmp_path)  # remembered, not tried again


def test_every_command_turns_it_on_and_a_bad_size_is_one_line(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "run_in_workdir", lambda *a: calls.append("ran"))
    monkeypatch.setattr(compile_cache, "enable", lambda *a: calls.append("enabled"))
    argv = ["train", "--config", str(REPO / "configs" / "demo.py"), "--workdir", str(tmp_path)]
    assert cli.main(argv) == 0
    assert calls == ["enabled", "ran"]
    monkeypatch.undo()
    monkeypatch.setattr(cli, "run_in_workdir", lambda *a: calls.append("ran"))
    for bad in ("lots", "0", "-5", "nan"):
        monkeypatch.setenv(compile_cache.ENV_MB, bad)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"qarjax: error: {compile_cache.ENV_MB} must be a positive number of "
                       f"megabytes, got {bad!r}")  # fmt: skip
    assert calls == ["enabled", "ran"]  # refused before any work
