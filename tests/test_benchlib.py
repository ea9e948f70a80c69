"""The benchmarks' shared helpers (experiments/benchlib.py): what every JSON records about
the machine it ran on."""

import doctest
import json
import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "experiments"))
import benchlib  # noqa: E402


def test_docstring_examples_run():
    assert doctest.testmod(benchlib).failed == 0


def test_others_cpu_share_counts_the_machines_busy_time_less_this_process():
    quiet = benchlib.others_cpu_share((0.0, 50.0, 1.0), (4.0, 58.0, 9.0), cores=2)
    assert quiet == 0.0  # all 8 busy core-seconds were this process's
    busy = benchlib.others_cpu_share((0.0, 50.0, 1.0), (4.0, 62.0, 9.0), cores=2)
    assert busy == 0.5  # 4 of 8 core-seconds were someone else's
    assert benchlib.others_cpu_share((0.0, None, 1.0), (4.0, 62.0, 9.0)) is None  # not Linux
    start = benchlib.cpu_sample()
    sum(i * i for i in range(200_000))  # this process's own work
    share = benchlib.others_cpu_share(start, benchlib.cpu_sample())
    assert share is None or 0.0 <= share <= 1.0


def test_every_json_says_how_busy_the_machine_was(tmp_path, capsys):
    path = tmp_path / "bench.json"
    benchlib.write_json(str(path), {"device": "cpu", "results": []})
    written = json.loads(path.read_text())
    assert "others_cpu_share" in written and written["results"] == []


def test_a_benchmarks_finished_children_are_its_own_work():
    import subprocess

    start = benchlib.cpu_sample()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert benchlib.cpu_sample()[2] - start[2] >= 0.5  # the child's CPU seconds
