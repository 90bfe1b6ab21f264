"""The privacy report from synthetic rows in the CSV schema (no training): the paired verdict,
the defences table, the split between defended and undefended rows and between regimes, the
summary for a privacy officer and its copy into docs/privacy.md, and write_report end to end.
"""

import math

import numpy as np
import pandas as pd
import pytest

from experiments.privacy_defences import (
    defence_rows,
    defence_table,
    fmt_epsilon,
    paired_gap,
    verdict,
    verdict_lines,
)
from experiments.privacy_report import (
    attack_table,
    noise_table,
    scale_table,
    summarise,
    with_attacker_columns,
)
from experiments.privacy_rows import COLUMNS, append_rows
from experiments.privacy_summary import (
    END,
    START,
    officer_summary,
    replace_between_markers,
)
from experiments.privacy_text import report_markdown, write_report

SEEDS = (0, 1, 2)
# strong white-box PSNR / SSIM / accuracy per seed of the finetune victims (faces, pathology)
FT = {
    ("faces", "identity", 16): {"psnr": [30.0, 31.0, 32.0], "ssim": [0.90, 0.91, 0.92], "acc": [0.80, 0.82, 0.84]},
    ("faces", "rdfsq", 2): {"psnr": [26.0, 28.0, 27.0], "ssim": [0.60, 0.70, 0.65], "acc": [0.79, 0.81, 0.82]},
    ("faces", "rdfsq", 1): {"psnr": [22.0, 22.0, 22.0], "ssim": [0.40, 0.40, 0.40], "acc": [0.70, 0.70, 0.70]},
    ("pathology", "identity", 16): {"psnr": [28.0, 28.0, 28.0], "ssim": [0.80, 0.80, 0.80], "acc": [0.90, 0.90, 0.90]},
    ("pathology", "rdfsq", 2): {"psnr": [24.0, 24.0, 24.0], "ssim": [0.30, 0.30, 0.30], "acc": [0.87, 0.87, 0.87]},
}
BLACK_BOX_GAP = {"faces": 1.0, "pathology": 0.5}  # black-box PSNR: 15 dB for fp16, 15 - gap for 2 bits
BASELINE = {"faces": (12.0, 0.25), "pathology": (14.0, 0.30)}  # mean-image PSNR, SSIM


def _row(**kw) -> dict[str, object]:
    row = {"regime": "finetune", "sigma": 0.0, "clip": 0.0, "nopeek": 0.0, "text_mode": "ids", "public_scale": 1,
           "epsilon": "", "delta": "", "releases_max": 8, "acc_per_round": "", "psnr_std": 1.0, "ssim_std": 0.05,
           "n_images": 100, "capture_bytes": 1000, "ledger_wire_bytes": 1000, "ledger_payload_bytes": 900,
           "ledger_feature_bytes": 800, "consumed_bytes": 800, "feature_bytes_per_image": 8.0,
           "prompt_token_recovery": 1.0, "prompt_exact_recovery": 1.0, "answer_recovery": 1.0, "feature_rms": 0.5,
           "feature_norm_median": 4.0, "public_images": 1600, "decoder_steps": 300, "best_step": 200,
           "val_psnr": 20.0, "stopped_early": True, "train_s": 1.0, "train_cpu_s": 1.0, "attack_s": 1.0,
           "attack_cpu_s": 1.0, **kw}
    row["key"] = "-".join(str(row[k]) for k in ("regime", "dataset", "method", "bits", "sigma", "clip", "nopeek",
                                                 "seed", "text_mode", "threat", "attacker", "public_scale"))
    return row


def _victim(rows: list, regime: str, dataset: str, method: str, bits: int, seed: int, psnr: float, ssim: float,
            acc: float, threats=("white-box", "mean-image"), attackers=("weak", "strong"), bb_psnr=None, **kw) -> None:
    for t in threats:
        if t == "mean-image":
            rows.append(_row(regime=regime, dataset=dataset, method=method, bits=bits, seed=seed, threat=t,
                             attacker="none", psnr=BASELINE[dataset][0], ssim=BASELINE[dataset][1], acc=acc, **kw))
            continue
        for a in attackers:
            p = psnr if t == "white-box" else bb_psnr
            # the weak attacker is 5 dB below the strong one
            rows.append(_row(regime=regime, dataset=dataset, method=method, bits=bits, seed=seed, threat=t, attacker=a,
                             psnr=p - (5.0 if a == "weak" else 0.0), ssim=ssim, acc=acc, **kw))


def synthetic_rows() -> tuple[list, list]:
    """(finetune rows, scratch rows) in the CSV schema."""
    ft = []
    for (d, m, b), v in FT.items():
        accept = (m, b) in (("identity", 16), ("rdfsq", 2))
        for i, seed in enumerate(SEEDS):
            bb = 15.0 - (BLACK_BOX_GAP[d] if m == "rdfsq" else 0.0)
            _victim(ft, "finetune", d, m, b, seed, v["psnr"][i], v["ssim"][i], v["acc"][i],
                    threats=("white-box", "black-box", "mean-image") if accept else ("white-box", "mean-image"),
                    bb_psnr=bb)
    for sigma, eps, psnr, acc in ((0.5, 12345.6, [20.0, 21.0, 22.0], [0.70, 0.72, 0.71]),
                                  (1.0, 40.0, [18.0, 18.0, 18.0], [0.60, 0.60, 0.60])):
        for i, seed in enumerate(SEEDS):
            _victim(ft, "finetune", "faces", "rdfsq", 2, seed, psnr[i], 0.3, acc[i], sigma=sigma, clip=2.0,
                    epsilon=eps, delta=1e-5)
    for i, seed in enumerate(SEEDS):  # NoPeek: 2 dB lower, 1 point lower than the 2-bit reference
        _victim(ft, "finetune", "faces", "rdfsq", 2, seed, [24.0, 25.0, 26.0][i], 0.5, FT["faces", "rdfsq", 2]["acc"][i]
                - 0.01, nopeek=0.5)
        for a, rec in (("weak", 0.4), ("strong", 0.6)):
            ft.append(_row(dataset="faces", method="rdfsq", bits=2, seed=seed, text_mode="quantized",
                           threat="white-box", attacker=a, psnr=20.0, ssim=0.5, acc=0.75, prompt_token_recovery=rec,
                           prompt_exact_recovery=rec / 2))
    scratch = []
    for d in ("faces", "pathology"):
        for m, b, p in (("identity", 16, 33.33), ("rdfsq", 2, 23.45)):
            for seed in (0, 1):
                _victim(scratch, "scratch", d, m, b, seed, p, 0.5, 0.5, attackers=("weak",), bb_psnr=11.0,
                        threats=("white-box", "black-box", "mean-image"))
    _victim(scratch, "scratch", "faces", "rdfsq", 2, 0, 19.99, 0.2, 0.4, attackers=("weak",), sigma=0.5)
    return ft, scratch


@pytest.fixture
def frames():
    ft, scratch = synthetic_rows()
    return with_attacker_columns(pd.DataFrame(ft)), with_attacker_columns(pd.DataFrame(scratch))


# ----------------------------------------------------------------------------- the pairing and the verdict
def test_paired_gap_is_the_mean_and_standard_error_of_the_per_seed_differences():
    df = pd.DataFrame({
        "method": ["a", "a", "a", "a", "a", "b", "b", "b"],
        "seed": [0, 1, 2, 2, 3, 0, 1, 2],  # seed 2 of a twice (averaged: 8), seed 3 of a has no partner
        "psnr": [12.0, 15.0, 7.0, 9.0, 99.0, 10.0, 11.0, 2.0],
    })
    mean, se, n = paired_gap(df, {"method": "a"}, {"method": "b"}, "psnr")
    # differences 2, 4, 6: mean 4, std 2, se 2 / sqrt(3)
    assert n == 3 and mean == pytest.approx(4.0) and se == pytest.approx(2 / math.sqrt(3))
    mean, se, n = paired_gap(df[df.seed == 0], {"method": "a"}, {"method": "b"}, "psnr")
    assert (mean, n) == (2.0, 1) and math.isnan(se)
    mean, se, n = paired_gap(df, {"method": "a"}, {"method": "c"}, "psnr")
    assert n == 0 and math.isnan(mean) and math.isnan(se)


def test_verdict_thresholds_on_both_sides():
    assert verdict(3.0, 2.0) == "reproduced"
    assert verdict(2.99, 0.0) == "not reproduced (the PSNR gap is below 3 dB)"
    assert verdict(5.0, 2.01) == "not reproduced (the accuracy loss exceeds 2 points)"
    assert verdict(1.0, 3.0) == ("not reproduced (the PSNR gap is below 3 dB and the accuracy loss exceeds 2 "
                                 "points)")
    assert verdict(math.nan, 1.0) == "not measured"


def test_verdict_lines_pair_the_strong_undefended_runs_by_seed(frames):
    ft, _ = frames
    text = "\n".join(verdict_lines(ft))
    # faces white-box: gaps 4, 3, 5 dB (se 1/sqrt 3) and 1, 1, 2 points; the NoPeek and noise runs stay out
    assert ("* **faces, white-box**: **reproduced**. PSNR gap +4.00 ± 0.58 dB, SSIM gap +0.260 ± 0.026, accuracy "
            "loss +1.33 ± 0.33 points; n = 3 seed pairs.") in text
    assert "* **faces, black-box**: **not reproduced (the PSNR gap is below 3 dB)**. PSNR gap +1.00 ± 0.00 dB" in text
    assert "* **pathology, white-box**: **not reproduced (the accuracy loss exceeds 2 points)**" in text
    assert ("* **pathology, black-box**: **not reproduced (the PSNR gap is below 3 dB and the accuracy loss exceeds "
            "2 points)**") in text
    weak_only = "\n".join(verdict_lines(ft[ft.attacker != "strong"]))
    assert weak_only.count("not measured") == 4 and "reproduced" not in weak_only.replace("not reproduced", "")
    one_seed = "\n".join(verdict_lines(ft[ft.seed == 0]))
    assert "n = 1 seed pair (no standard error from one pair)" in one_seed


# ----------------------------------------------------------------------------- defended vs undefended rows
def test_defended_rows_stay_out_of_the_undefended_tables(frames):
    ft, scratch = frames
    full = summarise(pd.concat([ft, scratch]))
    # the regimes and the defences are separate summary rows
    ident = full[(full.dataset == "faces") & (full.method == "identity") & (full.threat == "white-box")
                 & (full.attacker == "weak")]
    assert sorted(zip(ident.regime, ident.seeds)) == [("finetune", 3), ("scratch", 2)]
    two = full[(full.regime == "finetune") & (full.dataset == "faces") & (full.method == "rdfsq") & (full.bits == 2)
               & (full.threat == "white-box") & (full.attacker == "strong") & (full.text_mode == "ids")]
    assert len(two) == 4  # undefended, two noise settings, NoPeek
    assert two[two.sigma == 0.5].epsilon.iloc[0] == pytest.approx(12345.6)
    s = full[(full.regime == "finetune") & (full.text_mode == "ids")]
    table = attack_table(s, "faces")
    two_bit = [line for line in table.splitlines() if line.startswith("| RD-FSQ b=2 |")]
    assert len(two_bit) == 1 and "| 22.00 ± 1.00 / 27.00 ± 1.00 |" in two_bit[0]
    scale = [line for line in scale_table(s, "faces").splitlines() if line.startswith("| RD-FSQ b=2 | white-box")]
    assert len(scale) == 1 and "22.00 ± 1.00" in scale[0]
    noise = noise_table(s[s.attacker != "strong"], "faces").splitlines()
    assert noise[0].startswith("| method | σ | C | seeds |") and len(noise) == 2 + 3  # σ = 0, 0.5, 1; no NoPeek row
    assert any(line.startswith("| RD-FSQ b=2 | 0.5 | 2 | 3 | 71.0") for line in noise)


def test_defence_rows_are_paired_with_the_undefended_two_bit_run(frames):
    ft, _ = frames
    rows = defence_rows(ft[ft.text_mode == "ids"])
    assert list(rows.family) == ["reference", "noise", "noise", "nopeek", "bits", "bits"]
    assert set(rows.attacker) == {"strong"}
    noise = rows[(rows.family == "noise") & (rows.sigma == 0.5)].iloc[0]
    # PSNR 20, 21, 22 against 26, 28, 27; accuracy 70, 72, 71 % against 79, 81, 82 %
    assert noise.d_psnr == pytest.approx(-6.0) and noise.d_psnr_se == pytest.approx(1 / math.sqrt(3))
    assert noise.d_acc == pytest.approx(-0.29 / 3) and noise.d_acc_n == 3
    assert noise.clip_ratio == pytest.approx(0.5) and noise.epsilon == pytest.approx(12345.6)
    table = defence_table(rows, 12.0)
    assert ("| feature noise (clip C) | σ = 0.5, C = 2 | 0.50 | 1.2e+04, δ = 1e-05 | 3 | 71.0 ± 0.6 | -9.7 ± 0.7 "
            "| 21.00 ± 0.58 | -6.00 ± 0.58 |") in table
    assert "| NoPeek | λ = 0.5 | – | no formal guarantee | 3 |" in table
    assert "| *mean public image (no information)* |" in table and "0 (reference)" in table
    weak = defence_rows(ft[(ft.text_mode == "ids") & (ft.attacker != "strong")])
    assert set(weak.attacker) == {"weak"}
    assert weak[weak.family == "reference"].psnr.iloc[0] == pytest.approx(22.0)
    assert fmt_epsilon(math.inf) == "∞" and fmt_epsilon(40.0) == "40" and fmt_epsilon(math.nan) == "–"
    assert fmt_epsilon(12345.6) == "1.2e+04" and fmt_epsilon(1.4812) == "1.48"


def test_old_rows_read_as_the_undefended_scratch_regime():
    old = pd.DataFrame([{"key": "k", "dataset": "faces", "method": "rdfsq", "bits": 2, "sigma": 0.0, "seed": 0,
                         "text_mode": "ids", "threat": "white-box", "psnr": 20.0}])
    df = with_attacker_columns(old)
    assert (df.regime.iloc[0], df["clip"].iloc[0], df.nopeek.iloc[0], df.attacker.iloc[0]) == ("scratch", 0, 0, "weak")
    assert math.isnan(df.epsilon.iloc[0])


# ----------------------------------------------------------------------------- the privacy officer's summary
def test_officer_summary_reports_the_measured_numbers(frames):
    ft, _ = frames
    text = officer_summary(ft)
    assert text.startswith("## Summary for a privacy officer\n")
    assert "recovers 60.0 % of their words" in text and "100.0 % of the question words" in text
    assert "| faces | 31.0 dB, SSIM 0.91 | 27.0 dB, SSIM 0.65 | 12.0 dB, SSIM 0.25 |" in text
    assert "**faces**: compression alone is not a defence; the images stay recognisable at 2 bits (SSIM 0.65)" in text
    assert "**pathology**: 2 bits blur the images (SSIM 0.30) but leave +10.0 dB over guessing" in text
    assert "| noise, σ = 0.5, C = 2 | 1.2e+04, δ = 1e-05 | +9.7 ± 0.7 | 21.0 |" in text
    assert "| NoPeek, λ = 0.5 | no formal guarantee | +1.0 ± 0.0 | 25.0 |" in text
    assert "Smallest ε measured: 40." in text and "run seed, which the server holds" in text
    assert len(text.splitlines()) <= 30
    # the verdict on compression follows the data: 2-bit codes no better than the mean image
    hidden = ft.copy()
    two = ((hidden.dataset == "faces") & (hidden.method == "rdfsq") & (hidden.bits == 2)
           & (hidden.threat != "mean-image"))
    hidden.loc[two, ["psnr", "ssim"]] = [12.5, 0.2]
    assert "**faces**: at 2 bits the attacker does no better than guessing the average image" in officer_summary(hidden)
    bare = officer_summary(ft[(ft.sigma == 0) & (ft.nopeek == 0) & (ft.text_mode == "ids")])
    assert "`text-mode=quantized` (disguised questions) was not measured" in bare and "| noise," not in bare


def test_markers_replace_only_the_summary_and_are_inserted_once():
    start, end = START, END
    text = f"# Privacy\n\nintro\n\n{start}\nold summary\n{end}\n\n## Datasets\nrest  \n"
    new = replace_between_markers(text, "## Summary\n\nnew")
    assert new == f"# Privacy\n\nintro\n\n{start}\n## Summary\n\nnew\n{end}\n\n## Datasets\nrest  \n"
    plain = "# Privacy case studies\n\nWho this is for.\n\n## Datasets\nrest\n"
    once = replace_between_markers(plain, "block one")
    assert once == f"# Privacy case studies\n\n{start}\nblock one\n{end}\n\nWho this is for.\n\n## Datasets\nrest\n"
    twice = replace_between_markers(once, "block two")
    assert twice.count(start) == 1 and "block one" not in twice
    assert twice.endswith("Who this is for.\n\n## Datasets\nrest\n")
    assert replace_between_markers("no heading\n", "b") == f"{start}\nb\n{end}\n\nno heading\n"


# ----------------------------------------------------------------------------- the page end to end
def _write_csvs(out, ft, scratch=None):
    append_rows(out / "privacy.csv", ft)
    if scratch is not None:
        append_rows(out / "privacy_scratch.csv", scratch)


def test_write_report_puts_both_regimes_in_one_page(tmp_path, monkeypatch):
    from experiments import privacy_text

    ft, scratch = synthetic_rows()
    out = tmp_path / "results"
    out.mkdir()
    _write_csvs(out, ft, scratch)
    assert tuple(pd.read_csv(out / "privacy.csv").columns) == COLUMNS
    docs = tmp_path / "privacy_doc.md"
    original = "# Privacy case studies\n\nWho this is for.\n\n## Datasets\n\nunchanged text\n"
    docs.write_text(original)
    monkeypatch.setattr(privacy_text, "DOCS", docs)
    write_report(out / "privacy.csv", tmp_path / "examples", out, quick=False)  # not the default folder: no docs
    assert docs.read_text() == original
    md = (out / "privacy.md").read_text()
    first = md.split("\n\n")[1]
    assert "reads every question and every answer directly" in first
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[:3] == ["## Summary for a privacy officer", "## Verdict (strong attacker, paired by seed)",
                         "## How this page is made"]
    second = "## Second regime: trained from random weights (earlier study; weak attacker; 2 seeds)"
    assert second in heads and heads.index(second) > heads.index("## What compression does not protect")
    ft_part, scratch_part = md.split(second)
    # the scratch identity runs (weak attacker: 33.33 - 5 dB) only in their section
    assert "28.33" not in ft_part and "| identity fp16 | 8 | 2 | 50.0 ± 0.0 | 28.33 ± 0.00 / – |" in scratch_part
    assert "| RD-FSQ b=2 | 0.5 | 1 | 40.0 | 14.99" in scratch_part  # its noise table (weak: 19.99 - 5 dB)
    assert "(3 seeds; 2 seeds in the second regime)" in md
    assert "fine-tunes the shipped checkpoint `checkpoints/tiny-vlm` (width 128, 32 px, 64 image tokens)" in md
    assert "8 rounds = 1 alignment + 7 fine-tuning, 60 micro-batches of 8 per client" in md
    assert "Noise is not a formal guarantee" not in md and "ε from 40 to 1.2e+04 at δ = 1e-05" in md
    assert "![defences: accuracy vs strong white-box PSNR](privacy_defences.png)" in md
    assert (out / "privacy_defences.png").is_file() and (out / "privacy_utility.png").is_file()
    summary = pd.read_csv(out / "privacy_summary.csv")
    assert set(summary.regime) == {"finetune", "scratch"} and {"clip", "nopeek", "epsilon"} <= set(summary.columns)
    # the default results folder: docs get the summary between the markers, quick runs leave them alone
    monkeypatch.setattr(privacy_text, "RESULTS", out)
    write_report(out / "privacy.csv", tmp_path / "examples", out, quick=True)
    assert docs.read_text() == original
    write_report(out / "privacy.csv", tmp_path / "examples", out, quick=False)
    text = docs.read_text()
    assert text.startswith(f"# Privacy case studies\n\n{START}\n## Summary for a privacy officer\n\n_Generated by")
    assert text.endswith(f"{END}\n\nWho this is for.\n\n## Datasets\n\nunchanged text\n")
    assert "| faces | 31.0 dB, SSIM 0.91 | 27.0 dB, SSIM 0.65 |" in text


def test_report_degrades_to_not_measured(tmp_path):
    ft, _ = synthetic_rows()
    accept = [r for r in ft if r["sigma"] == 0 and r["nopeek"] == 0 and r["text_mode"] == "ids"
              and r["attacker"] != "strong"]
    out = tmp_path / "results"
    out.mkdir()
    _write_csvs(out, accept)
    write_report(out / "privacy.csv", tmp_path / "examples", out, quick=True)
    md = (out / "privacy.md").read_text()
    assert "Second regime" not in md and "Quick run" in md
    assert md.count("not measured (no strong-attacker rows") == 4
    assert "Not measured in this run: feature noise, NoPeek." in md
    assert "**Defences** (faces): not measured (no feature-noise or NoPeek runs)." in md
    assert "| bit width | RD-FSQ b=1 |" in md and (out / "privacy_defences.png").is_file()  # the weak attacker's
    df = with_attacker_columns(pd.DataFrame(accept))
    assert "_(not measured: no white-box rows" in report_markdown(df[df.dataset == "pathology"],
                                                                  summarise(df[df.dataset == "pathology"]), {}, {},
                                                                  out, False)
    assert np.isfinite(summarise(df).psnr).all()
