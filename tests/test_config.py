"""Config parsing: defaults match pyproject, bad values fail naming the key."""

import tomllib
from pathlib import Path

import pytest

from sim.config import ConfigError, SplitConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_key_with_the_dataclass_default():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == SplitConfig().to_run_config()
    assert SplitConfig.from_run_config(table) == SplitConfig()


def test_strings_from_the_command_line_are_coerced():
    cfg = SplitConfig.from_run_config({"bits": "3", "lr": "1e-3", "train-vision-tower": "false"})
    assert (cfg.bits, cfg.lr, cfg.train_vision_tower) == (3, 1e-3, False)


@pytest.mark.parametrize(
    "override, words",
    [
        ({"compressor": "zip"}, ["compressor", "identity", "rdfsq"]),
        ({"bits": 0}, ["bits", "[1, 8]"]),
        ({"compressor": "rdfsq", "bits": 9}, ["bits"]),
        ({"dataset": "llava-json"}, ["data-path", "required"]),
        ({"dataset": "llava-json", "data-path": "/nonexistent/x.json"}, ["data-path", "does not exist"]),
        ({"partitioner": "shards"}, ["partitioner", "iid", "dirichlet"]),
        ({"batch-size": "many"}, ["batch-size", "integer"]),
        ({"fraction-train": 0}, ["fraction-train"]),
        ({"lr": float("nan")}, ["lr"]),
        ({"image-size": 30}, ["patch-size", "image-size"]),
        ({"vision-tower": "./missing-dir"}, ["vision-tower", "does not exist"]),
        ({"num-rounds": 3}, ["Unknown config key", "num-server-rounds"]),
        ({"adam-beta2": 1.0}, ["adam-beta2"]),
        ({"grad-clip": -1.0}, ["grad-clip"]),
        ({"image-position": "last"}, ["image-position", "before-last-token"]),
    ],
)
def test_invalid_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        SplitConfig.from_run_config(override)
    for w in words:
        assert w in str(err.value)


def test_round_trip_through_run_config():
    cfg = SplitConfig(bits=3, compressor="identity", seed=7)
    assert SplitConfig.from_run_config(cfg.to_run_config()) == cfg
