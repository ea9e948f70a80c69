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
