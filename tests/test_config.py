"""Configs are locked everywhere: an unknown key is an error naming the closest key."""

import pytest
from helpers import REPO

from qarjax.config import check_key, default_config, load_config
from qarjax.errors import ConfigError


@pytest.mark.parametrize(
    "op",
    [
        lambda c: setattr(c.reg, "lamda", 0.3),
        lambda c: c.reg.lamda,
        lambda c: c.reg.__setitem__("lamda", 0.3),
        lambda c: c.reg["lamda"],
    ],
    ids=["set attribute", "get attribute", "set item", "get item"],
)
def test_a_typo_is_an_error_that_names_the_closest_key(op):
    config = default_config()
    with pytest.raises((AttributeError, KeyError), match='Did you mean "lam" instead of "lamda"'):
        op(config)
    assert "lamda" not in config.reg


def test_keys_are_added_only_when_unlocked():
    config = default_config()
    assert config.is_locked and config.reg.is_locked and config.augment.is_locked
    with config.unlocked():
        config.note = "a key added on purpose"
    assert config.note == "a key added on purpose"


@pytest.mark.parametrize(
    "file, arg",
    [("demo.py", None), ("demo.py", "softmin"), ("vgg16_cifar10.py", "nearest,runlocal"),
     ("alexnet_cifar10.py", None)],
)  # fmt: skip
def test_config_files_load_locked(file, arg):
    config = load_config(str(REPO / "configs" / file), arg)
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.num_epoch = 3
    if arg:
        assert config.reg.family == arg.split(",")[0]


@pytest.mark.parametrize(
    "key, closest",
    [("reg.lamda", "reg.lam"), ("augment.flp", "augment.flip"), ("num_epoch", "num_epochs"),
     ("reg.nope.x", None)],
)  # fmt: skip
def test_check_key_names_the_closest_key(key, closest):
    check_key(default_config(), "augment.crop_padding")  # an existing key passes
    with pytest.raises(ConfigError, match=f"unknown config key '{key}': the closest key is") as e:
        check_key(default_config(), key)
    if closest:
        assert str(e.value).endswith(f"the closest key is '{closest}'")


def test_a_config_lacking_keys_or_exiting_is_one_line(tmp_path):
    (tmp_path / "partial.py").write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'model': 'cnn_small', 'reg': {'k': 4}})\n"
    )
    with pytest.raises(ConfigError, match=r"lacks the keys 'augment', 'batch_size', .* more: "
                       r"build it from qarjax.config.default_config\(\)") as e:  # fmt: skip
        load_config(str(tmp_path / "partial.py"))
    assert "'augment.flip'" not in str(e.value)  # a missing section is named once
    (tmp_path / "exits.py").write_text("import sys\n\ndef get_config():\n    sys.exit(3)\n")
    with pytest.raises(ConfigError, match=r"config .*exits.py: it called sys.exit\(3\)"):
        load_config(str(tmp_path / "exits.py"))


def _set(config, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[key] = value


@pytest.mark.parametrize(
    "values, message",
    [
        ({"dataset": None}, r"dataset must be a dataset name, got None"),
        ({"dataset": "imagefolder:"}, r"dataset imagefolder: needs a path"),
        ({"lr_schedule": "step", "lr_boundaries": "5,5"}, r"lr_boundaries '5,5' must be rising"),
        ({"lr_schedule": "step", "lr_boundaries": "-1"}, r"after the warm-up \(1\)"),
        ({"lr_schedule": "step", "lr_boundaries": "10"}, r"before num_epochs \(10\)"),
        ({"lr_boundaries": "5"}, r"lr_boundaries='5' is for lr_schedule=step, not 'cosine'"),
        ({"reg.family": "nearest", "reg.start_epoch": 8, "reg.schedule": "warmup",
          "reg.warmup_epochs": 3}, r"reg.warmup_epochs=3 is longer than the regularized epochs"),
        ({"checkpoint_every": True}, r"checkpoint_every must be an integer >= 1, got True"),
        ({"branch_from": "/a", "init_from": "/b"}, r"branch_from and init_from are both set"),
        ({"quant.k": 1}, r"quant.k must be -1 \(reg.k\) or an integer in \[2, 65536\], got 1"),
    ],
)  # fmt: skip
def test_a_config_value_that_would_crash_later_or_be_ignored_is_refused(values, message):
    from qarjax.spec import build

    config = default_config()
    config.num_epochs = 10
    with config.unlocked():
        for key, value in values.items():
            _set(config, key, value)
    with pytest.raises(ConfigError, match=message):
        build(config)
