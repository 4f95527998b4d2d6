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
    assert "train.lr must be a number > 0, got -1" in capsys.readouterr().err  # the override after --out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.steps_per_epoch=-1",
            r"train.steps_per_epoch must be a whole number >= 1 \(or null\), got -1",
        ),
        ("train.steps_per_epoch=0", "train.steps_per_epoch must be a whole number >= 1"),
        ("model.options={filters: 0}", r"model.options.filters must be a whole number in \[1, 4096\], got 0"),
        ("model.options={dropout: 1.5}", r"model.options.dropout must be a number in \[0, 1\)"),
        ("model.options={fc_units: [16, 0]}", "model.options.fc_units must be a non-empty list of whole"),
        ("loss.age=-1", "loss.age must be a number >= 0, got -1"),
        ("loss.gender=.nan", "loss.gender must be a number >= 0, got nan"),
        ("train.lr=inf", "train.lr must be a number > 0, got inf"),
        ("train.lr=.nan", "train.lr must be a number > 0, got nan"),
        ("train.epochs=0", r"train.epochs must be a whole number in \[1, 1000000\]"),
        ("train.warmup_epochs=-2", "train.warmup_epochs must be a whole number >= 0"),
        ("train.step_factor=0", r"train.step_factor must be a number in \(0, 1\]"),
        ("train.step_epochs=[0]", "train.step_epochs must be a list of whole numbers >= 1"),
        ("train.seed=-1", "train.seed must be a whole number in"),
        ("train.verbose=3", "train.verbose must be 0, 1 or 2"),
        ("data.context=-1", "data.context must be a number >= 0"),
        ("data.batch_size=0", r"data.batch_size must be a whole number in \[1, 65536\]"),
        ("data.sources=[{manifest: m.json, weight: .inf}]", r"data.sources\[0\].weight must be a number > 0"),
    ],
)
def test_values_out_of_range_are_refused_at_load_naming_key_and_range(override, message):
    """A value that hangs training (steps_per_epoch=-1), maximises the error (loss.age=-1), overflows
    (lr=inf) or cannot build (filters=0) is refused before anything is built (issue 21, point 6)."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_shipped_config_and_recipe_passes_the_ranges():
    from pathlib import Path

    from c3ae.config import load_stages

    for name in bundled_configs():
        load_config(name)
    for recipe in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")):
        load_stages(recipe)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """A 0.5 KB file of nine nested aliases expands to 9**9 values: refused before anything walks it."""
    import time

    lines = ["model:", "  options:", '    a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"    a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1024
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"bomb.yaml expands to more than 100,000 values through its aliases"
    ):
        load_config(bomb)
    with pytest.raises(ConfigError, match="Override model.options expands to more than"):
        load_config(None, ["model.options={" + ", ".join(line.strip() for line in lines[2:]) + "}"])
    assert time.monotonic() - started < 2
    shallow = tmp_path / "anchors.yaml"  # anchors a real config might use are fine
    shallow.write_text("train: &t {epochs: 3}\nmodel: {name: c3ae}\n")
    assert load_config(shallow).train.epochs == 3
