"""Pretraining (``python -m sim pretrain``), the checkpoint directory, and split fine-tuning
from it: loading, stage freezing, reproducibility (docs/foundation.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCRATCH, scratch_cfg
from safetensors.torch import load_file

from sim.config import ConfigError, SplitConfig
from sim.data.tokenizer import get_tokenizer
from sim.model import build_client_model, build_server_model, client_state_names
from sim.model.pretrained import (
    CONNECTOR_FILE,
    MANIFEST_FILE,
    read_manifest,
    verify_checkpoint,
)
from sim.model.processor import image_processor
from sim.pretrain.recipe import QUICK
from sim.pretrain.train import pretrain
from sim.run.cli import main
from sim.training.client import client_runtime
from sim.training.reference import run_reference

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "tiny-vlm"


@pytest.fixture(scope="session")
def quick_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "quick"
    assert main(["pretrain", "--quick", "--out", str(out)]) == 0
    return out


def finetune_cfg(ckpt: Path, tmp_path: Path, **kw) -> SplitConfig:
    """A small job from ``ckpt``: the from-scratch regime's other values (synthetic data, the
    finetune stage unless ``kw`` says otherwise), not the default job's."""
    base = dict(init=str(ckpt), num_server_rounds=1, local_steps=2, steps_per_exchange=1, batch_size=4,
                align_batch_size=4, num_samples=120, image_size=QUICK.image_size, out_dir=str(tmp_path),
                run_name="run", checkpoint=False)
    return scratch_cfg(**{**base, **kw})


def test_quick_pretraining_writes_a_loadable_checkpoint(quick_ckpt):
    for part in ("vision_tower/config.json", "vision_tower/model.safetensors", "vision_tower/preprocessor_config.json",
                 "llm/config.json", "llm/model.safetensors", "tokenizer/tokenizer.json", CONNECTOR_FILE, MANIFEST_FILE,
                 "learning_curve.csv"):
        assert (quick_ckpt / part).is_file(), part
    manifest = read_manifest(quick_ckpt)
    assert manifest["steps"] == QUICK.steps and manifest["recipe"]["hidden_size"] == QUICK.hidden_size
    assert manifest["command"].startswith("python -m sim pretrain --out ") and "--quick" in manifest["command"]
    assert 0.0 <= manifest["final_metrics"]["accuracy"] <= 1.0
    assert set(manifest["files"]) >= {"llm/model.safetensors", CONNECTOR_FILE}
    assert verify_checkpoint(quick_ckpt) == []
    curve = (quick_ckpt / "learning_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,train_loss") and len(curve) == 1 + QUICK.steps // QUICK.eval_every


def test_quick_pretraining_is_deterministic(quick_ckpt, tmp_path):
    again = tmp_path / "again"
    pretrain(QUICK, again, command=["x"])
    assert read_manifest(again)["files"] == read_manifest(quick_ckpt)["files"]  # identical bytes, file by file
    assert (again / "learning_curve.csv").read_bytes() == (quick_ckpt / "learning_curve.csv").read_bytes()


def test_verify_names_a_changed_file(quick_ckpt, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(quick_ckpt, copy)
    weights = load_file(str(copy / CONNECTOR_FILE))
    assert main(["pretrain", "--verify", "--out", str(copy)]) == 0
    (copy / CONNECTOR_FILE).write_bytes((copy / CONNECTOR_FILE).read_bytes()[:-1] + b"\x00")
    assert verify_checkpoint(copy) == [f"{CONNECTOR_FILE}: sha256 differs"]
    assert main(["pretrain", "--verify", "--out", str(copy)]) == 1
    assert CONNECTOR_FILE in capsys.readouterr().err
    assert weights  # the original loaded


def test_pretrain_refuses_to_overwrite_and_rejects_bad_settings(quick_ckpt, capsys):
    assert main(["pretrain", "--quick", "--out", str(quick_ckpt)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown pretraining setting"):
        QUICK.with_overrides({"stepz": "3"})
    with pytest.raises(ConfigError, match="must be int"):
        QUICK.with_overrides({"steps": "many"})


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped checkpoint in this checkout")
def test_shipped_checkpoint_matches_its_manifest():
    assert verify_checkpoint(SHIPPED) == []


def test_init_loads_the_checkpoint_into_both_halves(quick_ckpt, tmp_path):
    cfg = finetune_cfg(quick_ckpt, tmp_path)
    assert cfg.vision_tower_source == str(quick_ckpt / "vision_tower") and not cfg.trains_vision_tower
    client = build_client_model(cfg)
    saved = load_file(str(quick_ckpt / CONNECTOR_FILE))
    for k, v in client.connector.state_dict().items():
        assert torch.equal(v, saved[k])
    tower = load_file(str(quick_ckpt / "vision_tower" / "model.safetensors"))
    own = client.tower.state_dict()
    assert tower and all(torch.equal(own[k], v) for k, v in tower.items() if k in own)
    server = build_server_model(cfg, len(get_tokenizer(cfg)))
    llm = load_file(str(quick_ckpt / "llm" / "model.safetensors"))
    mine = server.llm.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in llm.items() if k in mine)
    # the compressor is inserted fresh, starting at the identity where it has square projections
    assert torch.equal(client.codec.proj.weight, torch.eye(QUICK.hidden_size))
    # the frozen tower is not part of the client state, so it costs no FedAvg bytes
    assert not any(n.startswith("tower.") for n in client_state_names(client))
    # the checkpoint's tokenizer brings its chat template, and the client's prompts use it
    tok = get_tokenizer(cfg)
    assert tok.chat_template
    rt = client_runtime(cfg, 0, 2)
    user = tok.convert_tokens_to_ids("<user>")
    assert all(ids[0] == user for ids in rt.data.ids[:10])
    # and its pixels go through the checkpoint's image processor
    assert image_processor(cfg).to_dict() == type(image_processor(cfg)).from_pretrained(
        quick_ckpt / "vision_tower").to_dict()


def test_init_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SplitConfig(init=str(tmp_path / "missing"))
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="lacks manifest.json"):
        SplitConfig(init=str(tmp_path / "half"))


def _llm_weights(server) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in server.llm.state_dict().items()}


def test_align_stage_freezes_the_llm_and_tower(quick_ckpt, tmp_path):
    """stage=align: after a round the LLM and the tower are bit-identical to the checkpoint,
    have no optimiser state, and the tower sends no FedAvg bytes; the connector trained."""
    cfg = finetune_cfg(quick_ckpt, tmp_path, stage="align")
    before = build_server_model(cfg, len(get_tokenizer(cfg)))
    res = run_reference(cfg, 2, evaluate_rounds=False)
    after = res.server.model
    for k, v in _llm_weights(before).items():
        assert torch.equal(after.llm.state_dict()[k], v), k
    llm_params = {id(p) for p in after.llm.parameters()}
    assert not any(id(p) in llm_params for p in res.server.opt.state), "frozen LLM weights have optimiser state"
    assert len(res.server.opt.state) > 0, "the compressor's server half trained"
    assert not any(k.startswith("tower.") for k in res.client_weights)
    saved = load_file(str(quick_ckpt / CONNECTOR_FILE))
    assert any(not torch.equal(res.client_weights[f"connector.{k}"], v) for k, v in saved.items())
    # the ledger: a trained tower would add its fp32 weights to every client's FedAvg reply
    trained = run_reference(cfg.replace(train_vision_tower="true"), 2, evaluate_rounds=False)
    tower_bytes = 4 * sum(p.numel() for p in build_client_model(cfg).tower.parameters())
    extra = trained.ledger.totals()["uplink_payload_bytes"] - res.ledger.totals()["uplink_payload_bytes"]
    assert extra >= 2 * tower_bytes > 0


def test_finetune_stage_trains_the_llm_and_both_switches(quick_ckpt, tmp_path):
    cfg = finetune_cfg(quick_ckpt, tmp_path, stage="finetune")
    before = _llm_weights(build_server_model(cfg, len(get_tokenizer(cfg))))
    after = run_reference(cfg, 2, evaluate_rounds=False).server.model
    assert any(not torch.equal(after.llm.state_dict()[k], v) for k, v in before.items())
    both = finetune_cfg(quick_ckpt, tmp_path, stage="both", num_server_rounds=2, align_rounds=1)
    assert [both.stage_at(r) for r in (1, 2)] == ["align", "finetune"]
    res = run_reference(both, 2, evaluate_rounds=False)
    assert any(not torch.equal(res.server.model.llm.state_dict()[k], v) for k, v in before.items())


def test_fine_tuning_from_a_checkpoint_is_deterministic(quick_ckpt, tmp_path):
    cfg = finetune_cfg(quick_ckpt, tmp_path, stage="both", num_server_rounds=2, align_rounds=1)
    a = run_reference(cfg, 2, evaluate_rounds=True)
    b = run_reference(cfg, 2, evaluate_rounds=True)
    assert a.step_losses == b.step_losses and a.accuracy == b.accuracy
    assert json.dumps(a.eval_counts, sort_keys=True) == json.dumps(b.eval_counts, sort_keys=True)


def test_foundation_experiment_pairs_split_and_centralised_runs(quick_ckpt, tmp_path):
    """experiments.foundation on the quick checkpoint: both regimes per seed, paired, with
    the centralised run trained on exactly the split run's micro-batches."""
    from experiments import foundation

    overrides = {**SCRATCH, "init": str(quick_ckpt), "image-size": QUICK.image_size, "dataset": "pathology",
                 "num-samples": 160, "num-server-rounds": 2, "local-steps": 2, "stage": "both", "align-rounds": 1, "batch-size": 4,
                 "align-batch-size": 4}
    args = ["--seeds", "0", "1", "--clients", "2", "--out", str(tmp_path)]
    assert foundation.main(args + [a for k, v in overrides.items() for a in ("-c", f"{k}={v}")]) == 0
    rows = json.loads((tmp_path / "foundation.json").read_text())
    assert [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        assert len(r["split_rounds"]) == len(r["centralized_rounds"]) == 2
        assert r["zero_shot"] == r["centralized_detail"][0]["accuracy"]
    md = (tmp_path / "foundation.md").read_text()
    assert "retention" in md and "Paired difference" in md
    cfg = SplitConfig.from_run_config({k: str(v) for k, v in overrides.items()})
    central = foundation.Centralized(cfg, 2)
    from sim.training.client import micro_batch

    rts = [client_runtime(cfg, p, 2) for p in range(2)]
    expected = np.concatenate([micro_batch(rt, 2, 1) for rt in rts])
    assert np.array_equal(central.step_batch(2, 1), expected)


def test_frozen_client_half_gets_no_gradients_after_alignment(quick_ckpt, tmp_path):
    """client-finetune=frozen: after the align round no gradient goes down and no weight comes
    back (the ledger), the client weights stay as the align round left them, the LLM still
    trains, and the trained mode sends gradients in the same rounds."""
    from sim.training.reference import reference_engine, reference_transport
    from sim.training.server import initial_client_weights

    cfg = finetune_cfg(quick_ckpt, tmp_path, stage="both", num_server_rounds=3, align_rounds=1, local_steps=3,
                       steps_per_exchange=2, frozen_steps_per_exchange=2, client_finetune="frozen")
    after_round: dict[int, dict[str, torch.Tensor]] = {}
    engine = None

    def keep(report):
        after_round[report.round] = {k: v.clone() for k, v in engine.global_weights.items()}

    engine = reference_engine(cfg, evaluate_rounds=False, on_round=keep)
    llm_before = _llm_weights(engine.server.model)
    with reference_transport(cfg, 2) as transport:
        engine.run(transport, initial_client_weights(cfg), cfg.num_server_rounds, cfg.exchange_timeout_s)
    for rnd in (2, 3):
        for k, v in after_round[1].items():
            assert torch.equal(after_round[rnd][k], v), (rnd, k)
    assert any(not torch.equal(engine.server.model.llm.state_dict()[k], v) for k, v in llm_before.items())
    rows = [r for r in engine.ledger.rows if r.kind == "train.split_step"]
    frozen = [r for r in rows if r.round >= 2]
    assert sorted({r.exchange for r in frozen}) == [0, 1]  # one exchange per chunk of 2 steps, no weights exchange
    assert sorted({r.exchange for r in rows if r.round == 1}) == [0, 1, 2]
    weights_down = max(r.payload_bytes for r in frozen if r.direction == "down" and r.exchange == 0)
    assert all(r.payload_bytes == 0 for r in frozen if r.direction == "down" and r.exchange > 0)
    up_frozen = [r for r in frozen if r.direction == "up"]
    assert all(r.samples > 0 for r in up_frozen)  # every reply carries codes, none only weights
    assert weights_down > 0
    trained = run_reference(cfg.replace(client_finetune="train"), 2, evaluate_rounds=False)
    down_later = [r for r in trained.ledger.rows if r.round >= 2 and r.direction == "down" and r.exchange > 0]
    assert all(r.payload_bytes > 0 for r in down_later)  # gradients
    total = {"frozen": engine.ledger.totals(), "train": trained.ledger.totals()}
    assert total["frozen"]["downlink_payload_bytes"] < total["train"]["downlink_payload_bytes"]
    assert total["frozen"]["uplink_payload_bytes"] < total["train"]["uplink_payload_bytes"]  # no weights back


def test_frozen_rounds_grouping_changes_messages_not_results(quick_ckpt, tmp_path):
    """frozen-steps-per-exchange regroups a frozen round's micro-batches into fewer, larger
    exchanges (0: one per round) and changes nothing else: the same step losses, bit for
    bit, and the same accuracy; the align round keeps steps-per-exchange."""
    cfg = finetune_cfg(quick_ckpt, tmp_path, stage="both", num_server_rounds=2, align_rounds=1, local_steps=4,
                       steps_per_exchange=2, client_finetune="frozen", feature_noise=0.0)
    runs = {k: run_reference(cfg.replace(frozen_steps_per_exchange=k), 2) for k in (1, 0)}
    assert runs[1].step_losses == runs[0].step_losses and len(runs[0].step_losses) == 2 * 4
    assert runs[1].accuracy == runs[0].accuracy
    exchanges = {k: sorted({r.exchange for r in res.ledger.rows if r.kind == "train.split_step" and r.round == 2})
                 for k, res in runs.items()}
    assert exchanges == {1: [0, 1, 2, 3], 0: [0]}
    align = {k: sorted({r.exchange for r in res.ledger.rows if r.kind == "train.split_step" and r.round == 1})
             for k, res in runs.items()}
    assert align == {1: [0, 1, 2], 0: [0, 1, 2]}


def test_frozen_client_trains_in_every_align_round():
    """client-finetune freezes the client half in fine-tuning rounds only; stage=align trains it throughout."""
    cfg = SplitConfig.from_run_config({"stage": "both", "align-rounds": 2, "num-server-rounds": 4, "client-finetune": "frozen"})
    assert [cfg.client_trains_at(r) for r in (1, 2, 3, 4)] == [True, True, False, False]
    align = SplitConfig.from_run_config({"stage": "align", "client-finetune": "frozen"})
    assert all(align.client_trains_at(r) for r in (1, 2, 3))
    assert all(cfg.replace(client_finetune="train").client_trains_at(r) for r in (1, 2, 3, 4))
