"""Config parsing: defaults match pyproject, bad values fail naming the key."""

import math
import tomllib
from pathlib import Path

import pytest
from conftest import SCRATCH

from sim.config import FROM_SCRATCH, ConfigError, SplitConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_job_fine_tunes_the_shipped_checkpoint_on_pathology(tmp_path, monkeypatch):
    from sim.model.pretrained import verify_checkpoint

    monkeypatch.chdir(tmp_path)  # the shipped checkpoint resolves from any working directory
    cfg = SplitConfig()
    shipped = ROOT / "checkpoints" / "tiny-vlm"
    assert cfg.init_dir == shipped.resolve() and shipped.is_dir()
    assert verify_checkpoint(cfg.init_dir) == []
    assert (cfg.dataset, cfg.stage) == ("pathology", "both")
    assert cfg.vision_tower_source == str(shipped / "vision_tower") and cfg.llm_source == str(shipped / "llm")
    assert cfg.tokenizer_source == str(shipped / "tokenizer")
    assert not cfg.trains_vision_tower and cfg.rdfsq_send_range  # the pretrained tower stays frozen
    assert cfg.stage_at(1) == "align" and cfg.stage_at(cfg.num_server_rounds) == "finetune"


def test_from_scratch_is_the_former_default_regime():
    cfg = SplitConfig.from_run_config(FROM_SCRATCH)
    assert (cfg.init, cfg.init_dir, cfg.dataset, cfg.stage) == ("scratch", None, "synthetic", "finetune")
    assert (cfg.num_server_rounds, cfg.local_steps, cfg.steps_per_exchange, cfg.warmup_steps) == (10, 200, 20, 100)
    assert (cfg.align_batch_size, cfg.rdfsq_send_range) == (32, False)
    assert cfg.vision_tower_source == cfg.llm_source == "tiny" and cfg.tokenizer_source == "auto"
    assert cfg.trains_vision_tower  # auto: from scratch, the tower trains


def test_pyproject_lists_every_key_with_the_dataclass_default():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == SplitConfig().to_run_config()
    assert SplitConfig.from_run_config(table) == SplitConfig()


def test_strings_from_the_command_line_are_coerced():
    cfg = SplitConfig.from_run_config({"bits": "3", "lr": "1e-3", "checkpoint": "false", "train-vision-tower": True})
    assert (cfg.bits, cfg.lr, cfg.checkpoint, cfg.train_vision_tower) == (3, 1e-3, False, "true")
    assert cfg.trains_vision_tower  # a TOML boolean for a true/false/auto key
    assert not SplitConfig.from_run_config({**SCRATCH, "train-vision-tower": "false"}).trains_vision_tower
    assert SplitConfig.from_run_config(SCRATCH).trains_vision_tower  # auto: from scratch, the tower trains


def test_stages_split_the_rounds_and_each_has_its_own_schedule():
    from sim.training.schedule import lr_at

    cfg = SplitConfig.from_run_config({"stage": "both", "align-rounds": 2, "num-server-rounds": 5, "local-steps": 10,
                                       "warmup-steps": 0, "align-lr": 1e-3, "lr": 1e-4, "align-batch-size": 16})
    assert [cfg.stage_at(r) for r in range(1, 6)] == ["align", "align", "finetune", "finetune", "finetune"]
    assert [cfg.batch_size_at(r) for r in (1, 3)] == [16, cfg.batch_size]
    assert lr_at(cfg, 1, 0) == 1e-3 and lr_at(cfg, 3, 0) == 1e-4  # each stage's cosine starts at its peak
    m = cfg.min_lr_ratio  # the align stage's last step: u = 19/20 of its own 20 steps
    assert lr_at(cfg, 2, 9) == pytest.approx(1e-3 * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * 19 / 20))))
    with pytest.raises(ConfigError, match="align-rounds"):
        SplitConfig.from_run_config({"stage": "both", "align-rounds": 10, "num-server-rounds": 10})


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
        SplitConfig.from_run_config({**SCRATCH, **override})
    for w in words:
        assert w in str(err.value)


def test_round_trip_through_run_config():
    cfg = SplitConfig(bits=3, compressor="identity", seed=7)
    assert SplitConfig.from_run_config(cfg.to_run_config()) == cfg
