"""The privacy report: ``experiments/results/privacy.md`` and its plots, every number read
from the study's CSV.

:func:`write_report` summarises the rows and draws the plots (:mod:`experiments.privacy_report`),
then :func:`report_markdown` writes the Markdown from the raw rows (``df``), the
per-configuration summary (``s``), the study config and the paths of the example grids.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from experiments.privacy_attacker_text import strong_section, text_leakage_paragraph, text_table
from experiments.privacy_report import (
    _method_label, _pm, attack_table, example_grid, noise_table, plot_learning_curves, plot_psnr_vs_bits,
    plot_psnr_vs_bytes, plot_utility, strong_view, summarise, weak_view, with_attacker_columns,
)
from sim.data.casestudy import NUM_FACE_SOURCES, POOL_GRID, PUBLIC_CELLS, PUBLIC_FACE_SOURCES

ROOT = Path(__file__).resolve().parents[1]


def _f(x: float, digits: int = 2) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _get(s: pd.DataFrame, dataset: str, method: str, bits: int, threat: str, sigma: float = 0.0,
         col: str = "psnr") -> float:
    g = s[(s.dataset == dataset) & (s.method == method) & (s.bits == bits) & (s.threat == threat) & (s.sigma == sigma)]
    return float(g[col].iloc[0]) if len(g) else math.nan


def _baseline(s: pd.DataFrame, dataset: str, col: str = "psnr") -> float:
    g = s[(s.dataset == dataset) & (s.threat == "mean-image")]
    return float(g[col].mean()) if len(g) else math.nan


def _headline(s: pd.DataFrame, datasets: list[str]) -> list[str]:
    lines = []
    for d in datasets:
        ident, base = _get(s, d, "identity", 16, "white-box"), _baseline(s, d)
        r1 = _get(s, d, "rdfsq", 1, "white-box")
        vq = s[(s.dataset == d) & (s.method == "vq") & (s.threat == "white-box") & (s.sigma == 0)]
        vq_txt = (f"; AlignedVQ at {int(vq.bits.iloc[0])} bits per token (one index per token): "
                  f"**{vq.psnr.iloc[0]:.1f} dB**") if len(vq) else ""
        lines.append(
            f"* **{d}**: from the fp16 features the white-box attacker reconstructs the victim's held-out images "
            f"at **{_f(ident, 1)} dB** PSNR (SSIM {_f(_get(s, d, 'identity', 16, 'white-box', col='ssim'), 3)}); "
            f"from 1-bit RD-FSQ codes still **{_f(r1, 1)} dB** (SSIM {_f(_get(s, d, 'rdfsq', 1, 'white-box', col='ssim'), 3)})"
            f"{vq_txt}. Knowing nothing but the public images' mean gives {_f(base, 1)} dB.")
    return lines


def _findings(s: pd.DataFrame, who: str = "") -> list[str]:
    """Sentences computed from the summary: the margin over the baseline of the most protective
    compressor per threat model, and which black-box attacks beat the baseline; ``who`` names
    the attacker after the threat model (the weak one, unnamed, by default)."""
    out = []
    clean = s[s.sigma == 0]
    for d in sorted(set(clean.dataset)):
        base = _baseline(s, d)
        wb = clean[(clean.dataset == d) & (clean.threat == "white-box")]
        if len(wb) and base == base:
            worst = wb.loc[wb.psnr.idxmin()]
            ident = _get(s, d, "identity", 16, "white-box")
            out.append(
                f"* {d}, white-box{who}: the most protective compressor measured ({_method_label(worst.method, worst.bits)}, "
                f"{worst.bytes_per_image:,.0f} bytes per image) still leaves {worst.psnr - base:+.1f} dB over the "
                f"no-information baseline ({ident - worst.psnr:.1f} dB below fp16 features).")
        bb = clean[(clean.dataset == d) & (clean.threat == "black-box")]
        if len(bb) and base == base:
            above = bb[bb.psnr > base + 1.0]
            names = ", ".join(f"{_method_label(r.method, r.bits)} ({r.psnr:.1f} dB)" for _, r in above.iterrows())
            out.append(f"* {d}, black-box{who}: {len(above)} of {len(bb)} configurations beat the baseline by more than "
                       f"1 dB{': ' + names if names else ''}.")
    vq_bb = clean[(clean.method == "vq") & (clean.threat == "black-box")]
    if not who and len(vq_bb) and any(r.psnr > _baseline(s, r.dataset) + 1.0 for _, r in vq_bb.iterrows()):
        out.append(
            "* Why AlignedVQ is exposed even without the client weights: its wire alphabet is the codebook, which "
            "the server half holds to decode, and at `vit-ln1:0` the client half before it is only the patch "
            "embedding and a LayerNorm. A surrogate with the same codebook produces the same kind of indices, so "
            "a decoder trained on the surrogate's indices transfers to the victim's.")
    return out


def _text_section(df: pd.DataFrame, full: pd.DataFrame) -> str:
    rows = [text_table(df)]
    lines = []
    full = weak_view(full)
    for _, r in full[(full.text_mode == "quantized") & (full.threat == "white-box")].iterrows():
        ids = full[(full.text_mode == "ids") & (full.threat == "white-box") & (full.dataset == r.dataset)
                   & (full.method == r.method) & (full.bits == r.bits) & (full.sigma == r.sigma)]
        same = (f"; with `text-mode=ids` the same configuration reaches {100 * ids.acc.iloc[0]:.1f} % and "
                f"{ids.psnr.iloc[0]:.2f} dB") if len(ids) else ""
        lines.append(f"`text-mode=quantized` on {r.dataset} ({_method_label(r.method, r.bits)} for image and text, "
                     f"{r.seeds} seeds): task accuracy {_pm(r.acc, r.acc_err, 1, 100)} %, white-box image inversion "
                     f"{_pm(r.psnr, r.psnr_err, 2, kind=r.psnr_err_kind)} dB{same}.")
    return "\n".join(rows) + "\n\n" + "\n".join(lines)


def report_markdown(df: pd.DataFrame, full: pd.DataFrame, config: dict, grids: dict[str, Path], out: Path,
                    quick: bool, curves_png: bool = False) -> str:
    s_all = full[full.text_mode == "ids"]  # image results; text-mode=quantized rows only in the text section
    s = weak_view(s_all)  # the weak attacker and the baseline: the bits, bytes and noise results
    datasets = [d for d in ("faces", "pathology", "retina") if d in set(df.dataset)]
    budget = config.get("budget", {})
    train = budget.get("train", {})
    dec, sur = budget.get("decoder", {}), budget.get("surrogate", {})
    runs = df.drop_duplicates(["dataset", "method", "bits", "sigma", "seed", "text_mode"])
    cpu_train, cpu_attack = float(runs.train_cpu_s.sum()), float(df.attack_cpu_s.sum())
    wall_runs = float(runs.train_s.sum() + df.attack_s.sum())
    study_wall = config.get("study_wall_s")
    exact = bool((df.capture_bytes == df.ledger_wire_bytes).all())
    consumed_ok = bool((df[df.text_mode == "ids"].consumed_bytes == df[df.text_mode == "ids"].ledger_feature_bytes).all())
    rms = df.groupby("dataset").feature_rms.median().to_dict()
    md = [
        "# Privacy case studies: feature inversion from what crosses the wire",
        "",
        text_leakage_paragraph(df),
        "",
        ("> **Quick run** (`--quick`): a toy budget that checks the pipeline end to end; its numbers mean nothing.\n"
         if quick else ""),
        "Produced by `python -m experiments.inversion` (all numbers below are read from `privacy.csv`, which "
        "that command writes; `--report-only` rebuilds this page from it). "
        f"{len(runs)} trained victim configurations, {len(df)} result rows. Compute: "
        f"{(cpu_train + cpu_attack) / 60:.1f} min of CPU time on one torch thread (training {cpu_train / 60:.1f} min, "
        f"attacks {cpu_attack / 60:.1f} min; `process_time`), {wall_runs / 60:.1f} min of wall time in the runs"
        + (f", {study_wall / 60:.1f} min for the whole command" if study_wall else "")
        + " (wall time depends on what else shares the machine's 2 cores).",
        "",
        "**The question of a privacy team: what can the server, or anyone who reads the uplink, reconstruct "
        "from it, and how much does each compressor help?**",
        "",
        *_headline(s, [d for d in datasets if d in ("faces", "pathology")]),
        "",
        *_findings(s),
        *_findings(pd.concat([strong_view(s_all), s[s.threat == "mean-image"]]), " (strong attacker)"),
        "",
        "## Setup",
        "",
        f"* **Data** (`sim/data/casestudy.py`, provenance and licences in `docs/privacy.md`): `faces` "
        "(crops of scikit-image's `lfw_subset`, faces vs background) and `pathology` (tiles of the IHC slide "
        "`immunohistochemistry()`), with their questions. Clients hold the *private* pool; the attacker's "
        f"auxiliary images come from the disjoint *public* pool (faces: {len(PUBLIC_FACE_SOURCES)} of the "
        f"{NUM_FACE_SOURCES} source images; pathology: the {len(PUBLIC_CELLS)} anti-diagonal cells of a "
        f"{POOL_GRID} x {POOL_GRID} grid over the slide), so no pixel of a client's image is in the "
        f"attacker's training set. {budget.get('aux_samples', '?')} public images, seed {config.get('aux_seed', '?')}.",
        f"* **Model and training** (`sim.training.reference.run_reference`, the Flower app's step functions): tiny SigLIP "
        f"+ connector + tiny Llama, width {train.get('hidden-size')}, {train.get('image-size')} px images, "
        f"patch {train.get('patch-size')} ({(train.get('image-size', 32) // train.get('patch-size', 4)) ** 2} image "
        f"tokens); {config.get('clients', 2)} clients, {train.get('num-server-rounds')} rounds x "
        f"{train.get('local-steps')} micro-batches of {train.get('batch-size')}, {train.get('num-samples')} samples, "
        f"test fraction {train.get('test-fraction')}. AlignedVQ runs split at `{config.get('vq_split')}` "
        "(after LayerNorm 1 of vision block 0, residual rebuilt on the server). **Task accuracy** is the final "
        "round's exact match over all clients' held-out questions.",
        f"* **Victim**: partition {config.get('victim_partition', 0)}. The attacker's input is the victim's "
        "`evaluate.split_infer` reply (the codes of its held-out images) captured as the bytes Flower transports "
        "(`experiments/privacy_capture.py`) and decoded with the server's codec half by the ServerApp's own "
        "parser. Scores: PSNR and SSIM (`skimage.metrics`, data range 1, per image, then averaged) of the "
        "reconstructions against the victim's images.",
        f"* **Decoders**: the *weak* attacker (`experiments/attack.py`) is a conv decoder on the token grid, "
        f"{dec.get('steps')} Adam steps of {dec.get('batch')} pairs, width {dec.get('width')}; its black-box "
        f"surrogate trains {sur.get('steps')} steps of {sur.get('batch')} through the frozen server half. The "
        "*strong* attacker (`experiments/strong_attack.py`) is a U-Net trained until its validation PSNR on held-out "
        "public images stops improving, with a FORA-aligned surrogate (section *Weak vs strong attacker*), on "
        f"{', '.join(f'{k}x' for k in budget.get('public_scales', [1]))} the public pool (the larger pools for the "
        "first seed's acceptance configurations). Tables show `weak / strong`; the plots and the noise tables "
        "show the weak attacker.",
        f"* **Exactly the ledger's bytes**: in every row, the captured message is {'exactly' if exact else 'NOT'} "
        "the ledger row's `wire_bytes` long, and the features the decoder consumes are "
        f"{'exactly' if consumed_ok else 'NOT'} the row's `feature_bytes` (text-mode `ids` rows; with "
        "`quantized` the text stream is counted apart) — see the `capture_bytes`, `ledger_wire_bytes`, "
        "`consumed_bytes` and `ledger_feature_bytes` columns, and `tests/test_privacy.py`.",
        "",
        "## Threat models",
        "",
        "* **white-box**: the attacker (the server, or a participant tapping the uplink) knows the architecture, "
        "the run config (including the noise seed), the server half and the FedAvg'd client-half weights, which "
        "the server computes and every participant receives each round. It encodes its public images with the "
        "victim's own client half (same codec, same noise), so its decoder trains on exactly the distribution "
        "the victim sends. This is the realistic SplitFed case.",
        "* **black-box**: the same, minus the client-half weights (an eavesdropper, or aggregation run by a "
        "separate party). It trains a surrogate client half on its labelled public images through the frozen "
        "server half, fits the decoder on the surrogate's features, and re-standardises the victim's features "
        "with their own per-channel statistics before decoding. It is given the codecs' synchronised buffers "
        "(AlignedVQ's codebook), which the server half needs to decode anyway.",
        "* **mean image**: no information; every victim image is guessed as the mean public image.",
        "",
        "Error bars and ± are the standard deviation over seeds of the per-seed means (2 seeds); values marked † "
        "have one seed and show the standard error over the victim's images instead.",
        "",
    ]
    for d in [d for d in datasets if d in ("faces", "pathology")]:
        md += [f"## {d}: identity vs RD-FSQ b = 1, 2, 3 vs AlignedVQ", "",
               attack_table(s_all, d, methods=("identity", "rdfsq", "vq"), max_bits=3), ""]
    md += ["## Every compressor at b = 1..4 (white-box; seed 0 unless the seeds column says otherwise)", ""]
    for d in datasets:
        md += [f"### {d}", "", attack_table(s_all, d), ""]
    md += ["![PSNR vs bits](privacy_psnr_vs_bits.png)", "",
           "![PSNR vs bytes](privacy_psnr_vs_bytes.png)", ""]
    md += strong_section(full, df, config, datasets, curves_png)
    md += ["## Defence: Gaussian noise on the pre-quantisation features (`feature-noise` σ)", "",
           "The client adds `σ·n` (`n ~ N(0, I)`, seeded by the run seed and the image, `sim/feature_noise.py`) to "
           "its features before the compressor, in training and inference alike. σ is absolute: the median RMS of "
           "the (noise-free) features at the split point was " +
           ", ".join(f"{v:.2f} ({k})" for k, v in rms.items()) + ". The white-box attacker knows σ and the seed "
           "and trains its decoder on equally noisy features. Single-seed accuracies carry no error bar; the two-seed "
           "σ = 0 rows show how much one seed's accuracy moves.", ""]
    for d in sorted(set(s[s.sigma > 0].dataset)):
        md += [f"### {d}", "", noise_table(s, d), ""]
    md += ["![privacy/utility](privacy_utility.png)", ""]
    md += ["## Example reconstructions", ""]
    for d, path in grids.items():
        if path.is_relative_to(out):
            md += [f"![{d} examples]({path.relative_to(out).as_posix()})", ""]
        else:
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            md += [f"The `{d}` grid is written to `{shown.as_posix()}` only (git-ignored, outside the results): the "
                   "faces are photographs of real people.", ""]
    md += ["## What the server learns besides the image features", "",
           "Measured on the same captured replies (`prompt_token_recovery`, `prompt_exact_recovery`, "
           "`answer_recovery` in the CSV):", "",
           _text_section(df, full), "",
           "* **`text-mode=ids`** (default): every training reply carries each question *and answer* as token ids, "
           "with the loss mask; every evaluation reply carries the prompts, the reference answers (the server "
           "scores them), the question type and where the image goes. The server reads all of it.",
           "* **`text-mode=quantized`**: the question tokens travel as quantised embeddings of the LLM's own input "
           "table (the client holds a frozen copy). A white-box server encodes its public prompts the same way and "
           "either reads each decoded vector as the token whose encodings lie nearest on average (the weak reader, "
           "`TextInverter` in `experiments/attack.py`) or trains a decoder from the decoded text stream to the "
           "tokens, CapRecover-style (Xiu & Zhang, arXiv 2507.22828; the strong reader, `experiments/text_attack.py`: "
           "per-token logits with two convolutions of context, cross-entropy, stopped when the token accuracy on "
           "held-out public prompts stops improving); both measured above. The questions come from a few templates "
           "per dataset, so reading a question also reveals its type. The answers, the training labels, still go "
           "up as ids because the server computes the loss.",
           "* In both modes the server therefore learns each image's **label**: for `faces` whether it shows a "
           "face, its brightness and contrast class; for `pathology` the stain level, stain strength and nuclei "
           "class of every tile. These are exactly the sensitive attributes of the case studies.",
           "",
           "## What compression does not protect",
           "",
           "* **The image itself, against the white-box attacker.** The codec is a public, deterministic function "
           "of the features; the attacker runs it too. Fewer bits remove detail, but how much of the image survives "
           "even the smallest payloads is in the tables and the example grid above: compare each row with the "
           "mean-image baseline.",
           "* **Labels and questions** (section above), the question types, the shard sizes (`num-examples` in "
           "every final training reply), the number of held-out images, and timing.",
           "* **Message sizes**: with `entropy-coding` on, a payload's length depends on the content of its images.",
           "* **The client half itself**: its weights travel to the server every round (FedAvg), which is what "
           "makes the white-box attack possible; weight updates can leak training data on their own (not measured "
           "here).",
           "* **Noise is not a formal guarantee**: `feature-noise` gives no differential-privacy bound (no clipping "
           "of the features' sensitivity, the same noise for the same image), and the client could learn larger "
           "features that drown it. It trades accuracy for PSNR as measured above, nothing more.",
           "",
           "## Limitations",
           "",
           "* Tiny 32-pixel images and a tiny model trained for a short budget; a larger vision tower carries more "
           "detail and is likely easier to invert, not harder.",
           "* Two learning-based decoders, the larger one trained to a validation plateau; other attackers "
           "(optimisation-based inversion, image priors, generative decoders) can only raise these numbers. The "
           "black-box attacks are two surrogate strategies (task loss, and task loss plus FORA's MMD alignment "
           "without its discriminator); their failure does not prove that no black-box attack works.",
           "* The faces public pool holds 40 source images: its 2x and 4x pools are more augmented crops of the "
           "same people, not more people, so they test more data of one kind, not more diversity.",
           "* The public pool is a different part of the same source images (a realistic domain shift); an "
           "attacker with more similar images does better.",
           "",
           "## Files",
           "",
           "`privacy.csv` (one row per victim x threat x attacker x public-pool scale), `privacy_curves.csv` (the "
           "strong attacker's learning curves: step, training loss, validation PSNR or token accuracy), "
           "`privacy_summary.csv` (means over seeds), `privacy_config.json` (budget, grid gaps, errors), the PNG "
           "plots and the pathology example grid.",
           ""]
    return "\n".join(md)


# ----------------------------------------------------------------------------- report
def write_report(csv_path: Path, examples: Path, out: Path, quick: bool = False) -> None:
    df = with_attacker_columns(pd.read_csv(csv_path))
    full = summarise(df)
    full.to_csv(out / "privacy_summary.csv", index=False)
    s = weak_view(full[full.text_mode == "ids"])  # the image results; text-mode=quantized has its own section
    curves_csv = csv_path.with_name(csv_path.stem + "_curves.csv")
    curves = pd.read_csv(curves_csv) if curves_csv.exists() else pd.DataFrame(columns=["target"])
    curves = curves.drop_duplicates([c for c in ("key", "target", "step") if c in curves])  # a rerun after a crash
    curves_png = plot_learning_curves(curves, out / "privacy_learning_curves.png")
    plot_psnr_vs_bits(s, out / "privacy_psnr_vs_bits.png")
    plot_utility(s, out / "privacy_utility.png")
    plot_psnr_vs_bytes(s, out / "privacy_psnr_vs_bytes.png")
    grid_files = {}
    for d in sorted(set(df.dataset)):
        target = (examples if d == "faces" else out) / f"privacy_examples_{d}.png"
        if example_grid(examples, d, target):
            grid_files[d] = target
    config = json.loads((out / "privacy_config.json").read_text()) if (out / "privacy_config.json").exists() else {}
    (out / "privacy.md").write_text(report_markdown(df, full, config, grid_files, out, quick, curves_png))
