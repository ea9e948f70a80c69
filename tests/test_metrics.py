"""Metrics: JSONL lines and TensorBoard event files (tensorboardX, no TensorFlow)."""

import math
import os
import subprocess
import sys

from helpers import REPO

from qarjax.metrics import MetricsWriter, flatten, read_jsonl, to_python


def test_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(10, {"epoch": 1, "train": {"loss": 1.5}, "layers": {"fc": {"grid": [0.1, 0.2]}}})
    writer.write(20, {"epoch": 2, "train": {"loss": 1.2}})
    writer.close()
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[0]["layers"]["fc"]["grid"] == [0.1, 0.2]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.truncate_after(1)
    assert [line["epoch"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_flatten_and_to_python():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": 2.5, "e": True}) == {"a/b": 1.0, "d": 2.5}
    assert to_python({"x": float("nan")}) == {"x": "nan"}
    assert not math.isnan(len(to_python([1, 2])))


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    # a stand-in torch package on the path, which says when it is imported (torch itself is
    # no dependency; tensorboardX imports it whenever it is installed)
    (tmp_path / "pkgs" / "torch").mkdir(parents=True)
    (tmp_path / "pkgs" / "torch" / "__init__.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').touch()\nTensor = object\n"
    )
    code = (
        "import sys; from qarjax.metrics import MetricsWriter\n"
        f"w = MetricsWriter({str(tmp_path / 'run')!r}); w.write(1, {{'loss': 0.5}}); w.close()\n"
        "assert 'torch' not in sys.modules\n"
        "import torch  # the user's own import still works afterwards\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "pkgs"), str(REPO)])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "pkgs" / "torch" / "imported").exists()  # by the last line only
