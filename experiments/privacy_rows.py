"""The privacy study's resumable CSV files: ``privacy.csv`` (one row per victim configuration
x threat model x attacker x public-pool scale) and ``privacy_curves.csv`` (the strong
attacker's learning curves, one row per evaluation, keyed by the result row they belong to).

A rerun skips the keys already in ``privacy.csv`` (:func:`done_keys`); rows of another grid,
budget or config go to ``<stem>_stale.csv`` (:func:`set_aside_stale`). Files written before
the ``attacker`` and ``public_scale`` columns existed are rewritten in the current schema on
first touch (:func:`upgrade_schema`): their rows were made by the fixed-budget decoder on the
1x public pool, so they become ``attacker=weak`` (``none`` for the mean-image baseline),
``public_scale=1``; rows written before the fine-tuning regime, clipping and NoPeek become
``regime=scratch``, ``clip=0``, ``nopeek=0``; all keep their keys, which the weak rows of the current grid still hash
to, so they are reused, not recomputed.
"""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = (
    "key", "regime", "dataset", "method", "bits", "sigma", "clip", "nopeek", "seed", "text_mode", "threat", "attacker",
    "public_scale", "epsilon", "delta", "releases_max",
    "acc", "acc_per_round", "psnr", "psnr_std", "ssim", "ssim_std", "n_images",
    "capture_bytes", "ledger_wire_bytes", "ledger_payload_bytes", "ledger_feature_bytes", "consumed_bytes",
    "feature_bytes_per_image", "prompt_token_recovery", "prompt_exact_recovery", "answer_recovery", "feature_rms",
    "feature_norm_median",
    "public_images", "decoder_steps", "best_step", "val_psnr", "stopped_early",
    "train_s", "train_cpu_s", "attack_s", "attack_cpu_s",
)
CURVE_COLUMNS = (
    "key", "regime", "dataset", "method", "bits", "sigma", "clip", "nopeek", "seed", "text_mode", "threat", "attacker",
    "public_scale", "epsilon", "delta", "releases_max",
    "target", "step", "train_loss", "val_psnr", "val_token_accuracy",
)


def _current(row: dict[str, str]) -> dict[str, str]:
    """A row read from disk in the current schema (old rows: the weak attacker on the 1x pool)."""
    out = dict(row)
    if not out.get("attacker"):
        out["attacker"] = "none" if out.get("threat") == "mean-image" else "weak"
    if not out.get("public_scale"):
        out["public_scale"] = "1"
    if not out.get("regime"):  # written before the fine-tuning regime: trained from random weights
        out["regime"] = "scratch"
    for col in ("clip", "nopeek"):  # written before clipping and NoPeek: neither was on
        if not out.get(col):
            out[col] = "0"
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "key" not in reader.fieldnames:
            raise ValueError(f"{path}: not a privacy results CSV (no 'key' column); move it away to start over")
        return [_current(r) for r in reader]


def _header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f), [])


def _write(path: Path, rows: list[dict[str, object]], columns: tuple[str, ...]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in columns})
    tmp.replace(path)


def upgrade_schema(path: Path, columns: tuple[str, ...] = COLUMNS) -> bool:
    """Rewrite ``path`` in the schema ``columns`` if its header differs; returns whether it did."""
    if not path.exists() or tuple(_header(path)) == columns:
        return False
    _write(path, read_rows(path), columns)
    return True


def done_keys(path: Path) -> set[str]:
    return {row["key"] for row in read_rows(path)} if path.exists() else set()


def append_rows(path: Path, rows: list[dict[str, object]], columns: tuple[str, ...] = COLUMNS) -> None:
    upgrade_schema(path, columns)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in columns})


def set_aside_stale(path: Path, keys: set[str], columns: tuple[str, ...] = COLUMNS) -> int:
    """Move the rows of ``path`` whose key is not in ``keys`` (made with another grid,
    budget or config schema) to ``<stem>_stale.csv`` beside it, so the report only sees
    rows of the current study and nothing written earlier is lost. Returns their count."""
    if not path.exists():
        return 0
    upgrade_schema(path, columns)
    rows = read_rows(path)
    stale = [r for r in rows if r["key"] not in keys]
    if stale:
        append_rows(path.with_name(path.stem + "_stale.csv"), stale, columns)
        _write(path, [r for r in rows if r["key"] in keys], columns)
    return len(stale)
