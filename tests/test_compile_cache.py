"""The persistent compilation cache: a second process reads its programs back; JAX's own
setting wins; off, unwritable and over-full folders are handled."""

import os
import subprocess
import sys
import time

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
    unset = ("JAX_COMPILATION_CACHE_DIR", compile_cache.ENV)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROGRAM, *map(str, argv)], env=env,
                         capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    folder, hits, value = out.stdout.split()
    return folder, int(hits), float(value)


def test_the_second_process_reads_the_first_ones_programs_back(tmp_path):
    first = run(tmp_path / "cache")
    assert first[:2] == (str(tmp_path / "cache"), 0) and os.listdir(tmp_path / "cache")
    second = run(tmp_path / "cache")
    assert second[1] >= 1 and second[2] == first[2]  # read back, the same result
    # the default folder: one per host CPU and jaxlib, under XDG_CACHE_HOME
    folder, _, _ = run(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert folder == str(tmp_path / "xdg" / "qarjax" / "xla" / compile_cache.host_key())
    assert run(QARJAX_COMPILATION_CACHE=str(tmp_path / "env"))[0] == str(tmp_path / "env")


def test_off_unwritable_and_jaxs_own_setting(tmp_path):
    assert run(QARJAX_COMPILATION_CACHE="0")[0] == "None"
    (tmp_path / "file").write_text("")
    assert run(tmp_path / "file" / "cache")[0] == "None"  # cannot be made: no cache, no error
    # JAX's setting wins
    assert run(tmp_path / "mine", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))[0] == str(
        tmp_path / "jax"
    )
    assert not (tmp_path / "mine").exists()


def test_an_over_full_folder_loses_its_least_recently_used_entries(tmp_path):
    now = time.time()
    for i in range(10):  # entry i used i hours ago
        path = tmp_path / f"jit_f-{i}-cache"
        path.write_bytes(b"x" * 100)
        (tmp_path / f"jit_f-{i}-atime").write_bytes(b"t")
        os.utime(path, (now - 3600 * i, now - 3600 * i))
    (tmp_path / "notes.txt").write_bytes(b"y" * 5000)  # not the cache's: never counted or removed
    os.utime(tmp_path / "notes.txt", (0, 0))
    assert compile_cache.prune(tmp_path, 1000) == 0  # at the limit: kept
    assert compile_cache.prune(tmp_path, 900) == 6  # over it: down to half
    kept = [f"jit_f-{i}-{kind}" for i in range(4) for kind in ("atime", "cache")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "notes.txt"])


def test_every_command_turns_it_on_and_a_bad_size_is_one_line(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda *a: calls.append(a))
    assert cli.main(["train", "--config", "no/such/config.py", "--workdir", "w"]) == 2
    assert calls == [()]
    capsys.readouterr()
    monkeypatch.undo()
    for bad in ("lots", "0", "-5", "nan"):
        monkeypatch.setenv(compile_cache.ENV_MB, bad)
        assert cli.main(["train", "--config", "no/such/config.py", "--workdir", "w"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"qarjax: error: {compile_cache.ENV_MB} must be a positive number of "
                       f"megabytes, got {bad!r}")  # fmt: skip
