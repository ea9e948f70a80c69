"""Every model of the registry through every stage, at tiny scale on the CPU.

train (with a regularizer) -> quantize -> batch-norm re-estimate -> tune -> save -> load ->
eval: a stage that no test runs on a model would first fail on a GPU, where minutes are
scarce (VGG16's batch-norm re-estimate once crashed there: it has dropout after batch norm).
"""

import json

import numpy as np
import pytest
from conftest import make_dataset

from qarjax import compress
from qarjax.models import MODELS
from qarjax.pipeline import evaluate_artifact, run_pipeline

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_whole_pipeline_on_every_model(model, tiny_config, tmp_path):
    config = tiny_config
    config.model = model
    config.batch_size, config.eval_batch_size = 16, 16
    config.num_epochs = 2
    config.reg.family, config.reg.k, config.reg.lam, config.reg.start_epoch = "nearest", 4, 0.1, 1
    config.quant.tune_epochs, config.quant.batch_stats_batches = 1, 2
    dataset = make_dataset(n_train=32, n_test=16, size=32)
    report = run_pipeline(config, tmp_path, dataset=dataset)

    assert report["method"] == "nearest" and report["k"] == [4]
    for layer in report["sizes"]["layers"].values():
        assert layer["distinct_values"] <= 4
    for key in ("fp_accuracy", "pre_tuning_accuracy", "post_tuning_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text())["model"] == model

    # weights.png draws the grid the weights were trained towards, and the tuned codebooks
    drawn = json.loads((tmp_path / "report.json").read_text())["codebooks"]
    before = compress.load(tmp_path / "quantized.qarjax").layers
    artifact = compress.load(tmp_path / "tuned.qarjax")
    for name, lines in drawn.items():
        np.testing.assert_allclose(lines["grid"], np.asarray(before[name].codebook), rtol=1e-6)
        np.testing.assert_allclose(lines["tuned"], np.asarray(artifact.layers[name].codebook))
    params = artifact.params()
    for layer in artifact.layers.values():
        assert np.unique(np.asarray(layer.dequantize())).size <= 4
    evaluated = evaluate_artifact(config, params, artifact.batch_stats, dataset)
    assert evaluated["accuracy"] == pytest.approx(report["post_tuning_accuracy"], abs=1e-6)
