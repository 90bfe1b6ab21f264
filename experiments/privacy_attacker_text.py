"""The privacy report's text about the attackers: what the server reads of the questions
(the first paragraph and the text-leakage section) and the weak-versus-strong section
(convergence, gain, more public data), every number read from the study's rows
(``df``), their summary (``full``, :func:`experiments.privacy_report.summarise`) and the
learning curves. :mod:`experiments.privacy_text` puts them in ``privacy.md``.
"""

from __future__ import annotations

import pandas as pd

from experiments.privacy_report import _flags, _method_label, scale_table, strong_view, weak_view

VICTIM_COLS = ["regime", "dataset", "method", "bits", "sigma", "clip", "nopeek", "seed", "text_mode"]


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f} %"


def _reading(df: pd.DataFrame, attacker: str) -> pd.DataFrame:
    """One row per victim and public scale: what ``attacker`` read of the text (the same on every threat's row)."""
    return df[df.attacker == attacker].drop_duplicates([*VICTIM_COLS, "public_scale"])


def text_leakage_paragraph(df: pd.DataFrame) -> str:
    """The report's first paragraph: with ``text-mode=ids`` the server reads the text directly."""
    ids = df[df.text_mode == "ids"]
    q = df[df.text_mode == "quantized"]
    out = ("**The text needs no attack**: with the default `text-mode=ids` the server reads every question and "
           "every answer directly, because they go up as token ids")
    if len(ids):
        out += (f" (in this study's `ids` runs it read {_pct(ids.prompt_token_recovery.mean())} of the question "
                f"tokens and {_pct(ids.answer_recovery.mean())} of the answers straight from the captured replies)")
    out += ". With `text-mode=quantized` the answers (the training labels) stay in the clear and the questions go " \
           "up as quantised embeddings"
    strong, weak = _reading(q[q.public_scale == 1], "strong"), _reading(q, "weak")
    if len(weak):
        out += (f", from which a white-box server reads back {_pct(weak.prompt_token_recovery.mean())} of the question "
                f"tokens with a nearest-centroid reader ({_pct(weak.prompt_exact_recovery.mean())} of whole questions)")
    if len(strong):
        out += (f" and {_pct(strong.prompt_token_recovery.mean())} with a decoder trained on public prompts "
                f"({_pct(strong.prompt_exact_recovery.mean())} of whole questions)")
    return out + " (section *What the server learns besides the image features*)."


def text_table(df: pd.DataFrame) -> str:
    """Markdown: per text mode and reader, the share of question tokens, whole questions and answers read."""
    rows = ["| text mode | reader | question tokens read | whole questions read | answers read | runs |",
            "|---|---|---|---|---|---|"]
    ids = df[df.text_mode == "ids"].drop_duplicates(VICTIM_COLS)
    if len(ids):
        rows.append(f"| `ids` | none needed (token ids in the clear) | {_pct(ids.prompt_token_recovery.mean())} "
                    f"| {_pct(ids.prompt_exact_recovery.mean())} | {_pct(ids.answer_recovery.mean())} | {len(ids)} |")
    q = df[df.text_mode == "quantized"]
    readers = [("weak", 1, "nearest centroid (`TextInverter`)")]
    readers += [("strong", k, f"learned decoder, {k}x public prompts (`text_attack`)")
                for k in sorted(set(q[q.attacker == "strong"].public_scale))]
    for attacker, scale, label in readers:
        g = _reading(q, attacker)
        g = g[g.public_scale == scale]
        if len(g):
            rows.append(f"| `quantized` | {label} | {_pct(g.prompt_token_recovery.mean())} "
                        f"| {_pct(g.prompt_exact_recovery.mean())} | {_pct(g.answer_recovery.mean())} | {len(g)} |")
    return "\n".join(rows)


def strong_section(full: pd.DataFrame, df: pd.DataFrame, config: dict, datasets: list[str], curves_png: bool) -> list[str]:
    """Markdown lines: how the strong attacker is trained, whether it converged, what it changes."""
    budget = config.get("budget", {})
    strong = budget.get("strong", {})
    dec = strong.get("decoder", {})
    stop = dec.get("stop", {})
    rows = df[df.attacker == "strong"]
    md = ["## Weak vs strong attacker, and more public data", ""]
    if rows.empty:
        return md + ["_(no strong-attacker rows in `privacy.csv`)_", ""]
    early = _flags(rows.stopped_early)
    md += [
        f"The **weak** attacker is the fixed-budget conv decoder ({budget.get('decoder', {}).get('steps')} Adam steps). "
        f"The **strong** one (`experiments/strong_attack.py`) is a U-Net on the token grid (width "
        f"{dec.get('width')}, {dec.get('depth')} levels, a skip from the token grid into every upsampling stage) "
        f"trained with Adam ({dec.get('lr')}, batches of {dec.get('batch')}) until its PSNR on "
        f"{strong.get('val_samples')} held-out public images (a separate draw from the public pool, seed "
        f"{config.get('val_seed')}; never the victim's) stops improving: evaluated every {stop.get('eval_every')} "
        f"steps, {stop.get('patience')} evaluations without a gain of {stop.get('min_delta')} dB cut the learning "
        f"rate by {stop.get('lr_factor')} (at most {stop.get('lr_drops')} times, then stop), at most "
        f"{stop.get('max_steps')} steps; it keeps the best weights. Its black-box surrogate "
        f"({strong.get('surrogate', {}).get('steps')} steps) adds FORA's feature alignment: "
        f"{strong.get('mmd_weight')} x the multi-kernel MMD² (unbiased, Gaussian kernels at 5 bandwidths around "
        "the median distance; `experiments/mmd.py`) between its features and the victim's captured ones.",
        "",
        f"* **Convergence**: {int(early.sum())} of {early.notna().sum()} strong fits stopped on a validation plateau; "
        f"{int((early == 0).sum())} reached the {stop.get('max_steps')}-step cap. Steps to the kept weights: median "
        f"{rows.best_step.median():,.0f}, at most {rows.best_step.max():,.0f}. The kept weights' validation PSNR is "
        "the maximum of each curve (`val_psnr` in `privacy.csv`, curves in `privacy_curves.csv`).",
    ]
    md += _gain_lines(full)
    md += converged_lines(df, budget.get("converged"))
    for d in datasets:
        md += ["", f"### {d}", "", scale_table(full[full.text_mode == "ids"], d)]
    if curves_png:
        md += ["", "![learning curves of the strong attacker](privacy_learning_curves.png)"]
    return md + [""]


def converged_lines(df: pd.DataFrame, converged: dict | None) -> list[str]:
    """The check of the capped strong attacker against the ``converged`` one (the same decoder
    under a longer stopping rule) on the same victims: steps, stop, validation and victim PSNR,
    and the fp16 minus 2-bit gap under each."""
    conv = df[(df.attacker == "converged") & (df.text_mode == "ids")]
    if conv.empty:
        return []
    stop = (converged or {}).get("stop", {})
    keys = [*VICTIM_COLS, "threat"]
    capped = df[(df.attacker == "strong") & (df.public_scale == 1)]
    both = conv.merge(capped, on=keys, suffixes=("", "_capped"))
    both["plateau"] = _flags(both.stopped_early) == 1
    early = _flags(conv.stopped_early)
    out = ["", f"* **Is the capped strong attacker converged?** The same decoder trained under a longer rule "
           f"(at most {stop.get('max_steps')} steps, {stop.get('patience')} evaluations of patience, "
           f"{stop.get('lr_drops')} learning-rate drop; the `converged` rows) on the seed-{int(conv.seed.min())} "
           f"acceptance victims, white-box: {int(early.sum())} of {early.notna().sum()} stopped on a validation "
           "plateau. Its gain over the capped attacker, and the fp16 minus 2-bit gap under each:", "",
           "| dataset | method | steps run (capped → longer) | stopped on a plateau | validation PSNR (dB) | "
           "victim PSNR (dB) | victim SSIM |", "|---|---|---|---|---|---|---|"]
    for _, r in both.sort_values(["dataset", "method"]).iterrows():
        out.append(f"| {r.dataset} | {_method_label(r.method, r.bits)} | {r.decoder_steps_capped:,.0f} → "
                   f"{r.decoder_steps:,.0f} | {'yes' if r.plateau else 'no'} | "
                   f"{r.val_psnr_capped:.2f} → {r.val_psnr:.2f} | {r.psnr_capped:.2f} → {r.psnr:.2f} | "
                   f"{r.ssim_capped:.3f} → {r.ssim:.3f} |")
    for d in sorted(set(both.dataset)):
        g = both[both.dataset == d].set_index("method")
        if {"identity", "rdfsq"} <= set(g.index):
            out.append("")
            out.append(f"* {d}: fp16 minus 2-bit PSNR gap {g.psnr_capped['identity'] - g.psnr_capped['rdfsq']:+.2f} dB "
                       f"under the capped attacker, {g.psnr['identity'] - g.psnr['rdfsq']:+.2f} dB under the longer one "
                       "(one seed).")
    return out


def _gain_lines(full: pd.DataFrame) -> list[str]:
    """Strong minus weak PSNR (1x) per threat, verdicts that change, and the gain from more public data."""
    s = full[full.text_mode == "ids"]
    weak, strong = weak_view(s), strong_view(s)
    keys = ["regime", "dataset", "method", "bits", "sigma", "clip", "nopeek", "threat"]
    both = strong.merge(weak, on=keys, suffixes=("", "_weak"))
    base = s[s.threat == "mean-image"].groupby("dataset").psnr.mean()
    out = []
    for t in ("white-box", "black-box"):
        g = both[both.threat == t]
        if len(g):
            gain = g.psnr - g.psnr_weak
            out.append(f"* **Strong minus weak, {t}** (1x public pool, {len(g)} configurations): {gain.mean():+.2f} dB "
                       f"on average (from {gain.min():+.2f} to {gain.max():+.2f} dB).")
    margin = both.dataset.map(base)
    flips = both[(both.psnr_weak <= margin + 1.0) & (both.psnr > margin + 1.0)]
    names = ", ".join(f"{r.dataset} {_method_label(r.method, r.bits)} {r.threat}"
                      + (f" σ={r.sigma:g}" if r.sigma else "") + (f" C={r['clip']:g}" if r["clip"] else "")
                      + (f" λ={r.nopeek:g}" if r.nopeek else "") + f" ({r.psnr_weak:.1f} → {r.psnr:.1f} dB)"
                      for _, r in flips.iterrows())
    out.append(f"* **Verdicts that change**: {len(flips)} configurations where the weak attacker stays within 1 dB of "
               f"the mean-image baseline but the strong one beats it by more than 1 dB{': ' + names if names else ''}.")
    scales = sorted(set(s[s.attacker == "strong"].public_scale))
    if len(scales) > 1:
        top = strong_view(s, scales[-1]).merge(strong, on=keys, suffixes=("", "_1x"))
        for t in ("white-box", "black-box"):
            g = top[top.threat == t]
            if len(g):
                gain = g.psnr - g.psnr_1x
                out.append(f"* **More public data, {t}**: the strong attacker with {scales[-1]}x the public images gains "
                           f"{gain.mean():+.2f} dB over 1x on average (from {gain.min():+.2f} to {gain.max():+.2f} dB, "
                           f"{len(g)} configurations).")
    return out
