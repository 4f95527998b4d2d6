import pytest

from c3ae.config import ConfigError, apply_overrides, bundled_configs, config_from_dict, load_config


def test_defaults_and_bundled_configs_load():
    assert config_from_dict({}).model.name == "c3ae"
    assert {"c3ae", "ssrnet", "ssrnet-gender", "dldl", "levi_hassner"} <= set(bundled_configs())
    for name in bundled_configs():
        config = load_config(name)
        assert config.train.epochs >= 1
    ssrnet = load_config("ssrnet")
    assert (ssrnet.train.lr, ssrnet.train.schedule, ssrnet.train.step_epochs, ssrnet.train.epochs) == (
        0.001,
        "step",
        [30, 60],
        90,
    )
    assert ssrnet.data.batch_size == 50


def test_overrides_are_typed():
    config = load_config(
        "c3ae", ["model.name=ssrnet", "train.lr=0.001", "model.options.se=true", "train.epochs=3"]
    )
    assert config.model.name == "ssrnet" and config.train.lr == 0.001 and config.train.epochs == 3
    assert config.model.options["se"] is True
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # ints are accepted for floats
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.1 reads this as a string


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=0.1"], "Unknown config key train.lrr"),
        (["optimizer.lr=0.1"], "Unknown config key optimizer"),
        (["train.epochs=ten"], "train.epochs must be int"),
        (["data.augment=3"], "data.augment must be bool"),
        (["model.name=resnet"], "model.name: unknown family 'resnet'"),
        (["train.schedule=linear"], "train.schedule"),
        (["train.lr"], "must look like key=value"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_config_file_lists_bundled_ones():
    with pytest.raises(ConfigError, match="not found; give a YAML path or one of: c3ae"):
        load_config("nope.yaml")


def test_apply_overrides_does_not_mutate_input():
    data = {"train": {"lr": 0.1}}
    assert apply_overrides(data, ["train.lr=0.2"]) == {"train": {"lr": 0.2}}
    assert data == {"train": {"lr": 0.1}}


def test_train_overrides_may_follow_the_options(tmp_path, capsys):
    from c3ae.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("model: {name: c3ae}\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "train.lr=-1"]) == 2
    assert "train.lr must be > 0" in capsys.readouterr().err  # the override after --out was applied
    assert not (tmp_path / "run").exists()
