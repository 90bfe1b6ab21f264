"""Bad local input in whole runs: a missing or corrupt image, a malformed LLaVA record.

The loader's own cases (every kind of bad record, both policies) are in
tests/test_data_llava_json.py; here the same faults go through the runner and the
federated loop: the CLI stops before anything starts with an error naming the file and
record; ``on-bad-record=skip`` trains on the rest and counts what it skipped in
summary.json; a SuperNode with its own bad file fails with that message in the metrics
while the other sites carry on.
"""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import SCRATCH, scratch_cfg
from loopback import LoopbackGrid

from server_app.server_app import run_server
from sim.config import ConfigError, SplitConfig
from sim.data import generate_synthetic_vqa, write_llava_json
from sim.data.tokenizer import get_tokenizer
from sim.training.node import node_identity

ROOT = Path(__file__).resolve().parents[1]


def dataset(dir_: Path, n: int = 60, seed: int = 0) -> Path:
    return write_llava_json(generate_synthetic_vqa(n, seed=seed, image_size=16), dir_)


def break_records(path: Path) -> None:
    """Record 3 loses its image file, record 5's image is garbage, record 7 has no answer."""
    records = json.loads(path.read_text())
    (path.parent / records[3]["image"]).unlink()
    (path.parent / records[5]["image"]).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    records[7]["conversations"] = records[7]["conversations"][:1]
    path.write_text(json.dumps(records))


def cfg_for(tmp_path: Path, data: Path, **kw) -> SplitConfig:
    base = dict(
        num_server_rounds=1, local_steps=2, steps_per_exchange=2, batch_size=4, hidden_size=32, image_size=16,
        patch_size=4, dataset="llava-json", data_path=str(data), out_dir=str(tmp_path), run_name="run",
        expected_clients=2, exchange_timeout_s=5.0,
    )
    return scratch_cfg(**(base | kw))


def test_cli_stops_before_starting_and_names_the_file_and_record(tmp_path):
    data = dataset(tmp_path / "data")
    break_records(data)
    cmd = [sys.executable, "-m", "sim", "run", "--clients", "2", "--out", str(tmp_path / "run"),
           *[a for k, v in SCRATCH.items() for a in ("-c", f"{k}={v}")],
           "-c", "dataset=llava-json", "-c", f"data-path={data}", "-c", "image-size=16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert str(data) in proc.stderr and "record 3 (id='3')" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_skip_policy_trains_on_the_rest_and_counts_what_it_skipped(tmp_path):
    data = dataset(tmp_path / "data")
    break_records(data)
    summary = run_server(LoopbackGrid(2), cfg_for(tmp_path, data, on_bad_record="skip"), tmp_path / "run")
    assert summary["rounds"] == 1 and summary["rejected_messages"] == 0
    assert summary["bad_records"] == {"0": 3, "1": 3}  # both simulated clients read the same shared file


def test_a_site_with_a_bad_file_fails_with_the_reason_while_the_others_train(tmp_path):
    good, bad = dataset(tmp_path / "site0", seed=1), dataset(tmp_path / "site1", seed=2)
    break_records(bad)
    shared = tmp_path / "tokenizer"  # per-site data needs one tokenizer all sites and the server share
    get_tokenizer(scratch_cfg(dataset="llava-json", data_path=str(good), image_size=16)).save_pretrained(shared)
    cfg = cfg_for(tmp_path, "", tokenizer=str(shared)).replace(data_path="")
    nodes = [{"data-path": str(good)}, {"data-path": str(bad)}]
    summary = run_server(LoopbackGrid(2, node_configs=nodes), cfg, tmp_path / "run")
    dropped = pd.read_csv(tmp_path / "run" / "metrics.csv").iloc[0]["dropped"]
    assert dropped.startswith("1:exchange 0: error reply:") and f"{bad}: record 3 (id='3')" in dropped
    assert summary["rounds"] == 1 and summary["bad_records"] == {}  # site 0 skipped nothing


def test_node_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown node config keys"):
        node_identity({"partition-id": 0, "num-partitions": 2, "datapath": "x"})
    with pytest.raises(ConfigError, match="outside"):
        node_identity({"partition-id": 2, "num-partitions": 2})
    with pytest.raises(ConfigError, match="data-path"):  # empty run data-path needs a shared tokenizer
        scratch_cfg(dataset="llava-json", data_path="")
