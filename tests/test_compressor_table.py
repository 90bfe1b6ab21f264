"""The compressor acceptance table script in --quick mode (a smoke test of the driver)."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.common import methods

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_table_writes_every_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.compressor_table", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "compressors.csv")
    assert set(df.compressor) == set(methods())  # every registered image codec (uniform joined later)
    assert (df.wire_bytes_per_sample > df.payload_bytes_per_sample).all()
    assert (df.cosine > 0).all() and (df.encode_us_per_sample > 0).all()
    plain = df[(df.compressor == "rdfsq") & (df.variant == "per-dim")]
    assert (plain.payload_bytes_per_sample == plain.theoretical_bytes_per_sample).all()  # no side info, no padding
    ent = pd.read_csv(tmp_path / "compressors_entropy.csv")
    assert (ent[ent.method == "ans"].coded_over_entropy < 1.05).all()
    for name in ("compressors.md", "compressors_framing.csv", "compressors_text_recovery.csv", "compressors_config.json"):
        assert (tmp_path / name).is_file(), name
