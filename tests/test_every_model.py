"""Every model of the registry through every stage, at tiny scale on the CPU.

`qarjax run` (train with a regularizer -> quantize -> batch-norm re-estimate -> tune -> save ->
report), then load and evaluate: a stage that no test runs on a model would first fail on a
GPU, where minutes are scarce (VGG16's batch-norm re-estimate once crashed there: it has
dropout after batch norm). Both commands run in one subprocess on one CPU device, as on one
GPU (tests/cli_batch.py). VGG16 and AlexNet run at a quarter of their width (`model_width`:
the same layers, the same code in every stage; full width only costs CPU time: VGG16's `run`
55 s against 34 s); their full-width forward passes are in test_models.py.
"""

import json

import numpy as np
import pytest
from helpers import run_script, write_image_folder

from qarjax import compress
from qarjax.models import MODELS

pytestmark = pytest.mark.timeout(900)
SETTINGS = (
    "--config.batch_size=16", "--config.eval_batch_size=16", "--config.num_epochs=2",
    "--config.reg.start_epoch=1", "--config.reg.lam=0.1", "--config.tensorboard=False",
    "--config.quant.tune_epochs=1", "--config.quant.batch_stats_batches=2",
    "--config.warmup_epochs=0",
)  # fmt: skip


# cnn_small runs the same `qarjax run` (and quantize, tune, eval) in test_pipeline.py.
@pytest.mark.parametrize("model", sorted(set(MODELS) - {"cnn_small"}))
def test_whole_pipeline_on_every_model(model, tmp_path):
    # VGG16's five poolings need 32x32; the others run on 16x16 (AlexNet: 4x fewer fc1 weights)
    size = 32 if model == "vgg16" else 16
    folder = write_image_folder(tmp_path / "imgs", per_class=(11, 6), size=size)
    workdir = tmp_path / "run"
    args = (
        "--config",
        "configs/demo.py:nearest",
        "--workdir",
        str(workdir),
        f"--config.model={model}",
        f"--config.dataset=imagefolder:{folder}",
        *SETTINGS,
        *(("--config.model_width=0.25",) if model in ("vgg16", "alexnet") else ()),
    )
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([["run", *args], ["eval", *args]]))
    done = run_script("tests/cli_batch.py", str(rows), str(tmp_path / "out.json"), timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    result, evaluated = json.loads((tmp_path / "out.json").read_text())
    assert result["returncode"] == 0, result["stderr"][-3000:]

    report = json.loads((workdir / "report.json").read_text())
    assert report["model"] == model and report["method"] == "nearest" and report["k"] == [4]
    for layer in report["sizes"]["layers"].values():
        assert layer["distinct_values"] <= 4
    for key in ("fp_accuracy", "pre_tuning_accuracy", "post_tuning_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    # weights.png draws the grid the weights were trained towards, and the tuned codebooks
    before = compress.load(workdir / "quantized.safetensors").layers
    artifact = compress.load(workdir / "tuned.safetensors")
    for name, lines in report["codebooks"].items():
        np.testing.assert_allclose(lines["grid"], np.asarray(before[name].codebook), rtol=1e-6)
        np.testing.assert_allclose(lines["tuned"], np.asarray(artifact.layers[name].codebook))
    for layer in artifact.layers.values():
        assert np.unique(np.asarray(layer.dequantize())).size <= 4

    # eval: the same arithmetic as the run (one device); its line is the batch's last stdout
    assert evaluated["returncode"] == 0, evaluated["stderr"][-3000:]
    accuracy = json.loads(done.stdout.strip().splitlines()[-1])["accuracy"]
    assert accuracy == pytest.approx(report["post_tuning_accuracy"], abs=1e-6)
