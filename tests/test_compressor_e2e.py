"""Every compressor end to end on 2 clients for 1 round.

Fast: the in-process reference trainer (the same client/server functions as the apps).
Slow (``-m slow``): the real Flower simulation (``python -m sim run``), one run per
compressor, covering vq at ``vit-ln1:k`` (both residual modes), ``text-mode=quantized``
and each ``entropy-coding``; one of them is checked step by step against the reference.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SCRATCH
from test_simulation import run_cli

from sim.config import SplitConfig
from sim.training.reference import run_reference

TINY = {
    **SCRATCH,
    "num-server-rounds": 1, "local-steps": 2, "steps-per-exchange": 1, "batch-size": 4, "num-samples": 120,
    "hidden-size": 32, "image-size": 16, "patch-size": 4, "nf-block": 32,
}

CASES = {
    "identity": {"compressor": "identity"},
    "rdfsq-ans": {"compressor": "rdfsq", "bits": 2, "entropy-coding": "ans"},
    "fsq-zstd": {"compressor": "fsq", "bits": 3, "entropy-coding": "zstd"},
    "nf-text-quantized": {"compressor": "nf", "bits": 4, "text-mode": "quantized", "grad-compressor": "nf"},
    "topk": {"compressor": "topk", "bits": 4, "grad-compressor": "topk"},
    "vq-vit-rebuild-lora": {"compressor": "vq", "bits": 6, "split-point": "vit-ln1:0", "llm-lora-rank": 4},
    "vq-vit-transmit-ans-text": {
        "compressor": "vq", "bits": 6, "split-point": "vit-ln1:1", "residual-mode": "transmit",
        "entropy-coding": "ans", "text-mode": "quantized", "text-compressor": "rdfsq", "text-bits": 2,
    },
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_compressor_trains_in_process(name):
    cfg = SplitConfig.from_run_config({**TINY, **CASES[name]})
    res = run_reference(cfg, num_partitions=2)
    assert len(res.step_losses) == 2 and all(np.isfinite(res.step_losses))
    assert len(res.accuracy) == 1 and 0.0 <= res.accuracy[0] <= 1.0
    if cfg.compressor == "vq":  # the server decodes with the clients' folded, averaged codebook
        w = res.client_weights
        assert bool(w["codec.vq._codebook.initted"])
        assert torch.equal(res.server.model.codec.codebook, w["codec.vq._codebook.embed"][0])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_compressor_runs_in_the_flower_simulation(tmp_path, name):
    out = tmp_path / name
    proc = run_cli(out, 2, {**TINY, **CASES[name]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["clients"] == 2 and summary["compressor"] == CASES[name]["compressor"]
    ledger = pd.read_csv(out / "ledger.csv")
    up = ledger[(ledger.direction == "up") & (ledger.kind == "train.split_step")]
    assert (up.feature_bytes > 0).sum() == 2 * 2  # 2 clients x 2 exchanges that carry features
    steps = pd.read_csv(out / "steps.csv")
    assert len(steps) == 2 and np.isfinite(steps["loss"]).all()
    if CASES[name]["compressor"] == "vq":  # the codebook was initialised by one client before round 1
        assert (ledger.kind == "query.init_codec").sum() == 2  # request + reply
    if name == "vq-vit-transmit-ans-text":  # the Flower run is the reference run, step by step
        ref = run_reference(SplitConfig.from_run_config({**TINY, **CASES[name]}), num_partitions=2)
        assert max(abs(a - b) for a, b in zip(steps["loss"], ref.step_losses)) <= 1e-5
        assert list(pd.read_csv(out / "metrics.csv")["accuracy"]) == pytest.approx(ref.accuracy, abs=1e-9)
