"""The privacy report's paired comparisons, read from the raw rows of one regime: the verdict
on the 2-bit claim (fp16 vs RD-FSQ b=2 under the strong attacker) and the defences'
privacy/utility table and plot (feature noise with clipping, NoPeek, bit width), each
setting against the undefended run of the same seed. :mod:`experiments.privacy_text` puts
them in ``privacy.md``; :mod:`experiments.privacy_summary` reuses them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import paired_by_seed
from experiments.privacy_report import _method_label, _save, plt, undefended

CLAIM_DB, CLAIM_POINTS = 3.0, 2.0  # the claim: >= 3 dB harder to invert at <= 2 points of accuracy
FP16 = {"method": "identity", "bits": 16}
TWO_BIT = {"method": "rdfsq", "bits": 2}
FAMILIES = ("reference", "noise", "nopeek", "bits")
FAMILY_LABELS = {"reference": "none (reference)", "noise": "feature noise (clip C)", "nopeek": "NoPeek",
                 "bits": "bit width"}
# sim/training/feature_dp.py's threat model, in the report's words
EPSILON_SCOPE = (
    "ε is per image, against an honest-but-curious server (or an eavesdropper) that sees every uplink message: it "
    "bounds what the image stream of every training and evaluation message reveals about one image. It does **not** "
    "cover the text stream or the labels, nor the client weights sent back for FedAvg (trained on the images without "
    "noise; the bound treats them as known to the server), and it assumes the server cannot regenerate the noise. "
    "That holds where every SuperNode sets `noise-secret` in its node config, which never leaves it. The runs here "
    "are simulations without one: the noise is seeded from the run seed, which the server holds, so a server with a "
    "candidate image can regenerate the noise and the ε does not hold against it. The white-box attacker here is "
    "given the noise seed anyway, a stronger attacker than the ε assumes, so its PSNR numbers are conservative.")


def _select(df: pd.DataFrame, sel: dict[str, object]) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for col, value in sel.items():
        mask &= (df[col] == value).to_numpy()
    return df[mask]


def paired_gap(df: pd.DataFrame, a: dict[str, object], b: dict[str, object], col: str) -> tuple[float, float, int]:
    """``col`` of the rows matching ``a`` minus that of the rows matching ``b`` (column -> value),
    paired by ``seed`` (a seed's rows averaged; seeds on one side only dropped): the mean of the
    per-seed differences, their standard error ``std / sqrt(n)`` (ddof 1; NaN for n < 2) and n."""
    return paired_by_seed(_select(df, a).groupby("seed")[col].mean(), _select(df, b).groupby("seed")[col].mean())


def _pm(mean: float, se: float, digits: int, sign: bool = False) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if math.isnan(se) else f"{text} ± {se:.{digits}f}"


def fmt_epsilon(eps: float) -> str:
    """ε for a table: ``∞`` without clipping, ``1.2e+04`` from 1000 up, else 3 significant digits."""
    if eps is None or math.isnan(eps):
        return "–"
    if math.isinf(eps):
        return "∞"
    return f"{eps:.1e}" if eps >= 1000 else f"{eps:.3g}"


# ----------------------------------------------------------------------------- the verdict
def _attack_rows(df: pd.DataFrame, attacker: str = "strong") -> pd.DataFrame:
    """The undefended ``text-mode=ids`` rows of ``attacker`` on the 1x public pool."""
    return undefended(df[(df.text_mode == "ids") & (df.attacker == attacker) & (df.public_scale == 1)])


def verdict(psnr_gap: float, acc_gap_points: float) -> str:
    """``reproduced`` when the mean PSNR gap (fp16 minus 2-bit) is at least 3 dB and the mean
    accuracy loss at most 2 points, else ``not reproduced`` and which half fails."""
    if math.isnan(psnr_gap) or math.isnan(acc_gap_points):
        return "not measured"
    fails = ([f"the PSNR gap is below {CLAIM_DB:g} dB"] if psnr_gap < CLAIM_DB else []) + (
        [f"the accuracy loss exceeds {CLAIM_POINTS:g} points"] if acc_gap_points > CLAIM_POINTS else [])
    return "reproduced" if not fails else f"not reproduced ({' and '.join(fails)})"


def verdict_lines(df: pd.DataFrame, datasets: tuple[str, ...] = ("faces", "pathology")) -> list[str]:
    """Markdown lines: per dataset and threat model, the strong attacker's fp16-minus-2-bit PSNR,
    SSIM and accuracy gaps, paired by seed, and whether the claim holds."""
    rows = _attack_rows(df)
    out = [(f"The claim under test: *2-bit codes (RD-FSQ b=2) are at least {CLAIM_DB:g} dB harder to invert than "
            f"fp16 features, at a cost of at most {CLAIM_POINTS:g} points of task accuracy*. For each dataset and "
            "threat model, the strong attacker (1x public pool, undefended runs, `text-mode=ids`) attacks the fp16 "
            "and the 2-bit victim of the same seed; each gap is fp16 minus 2-bit, mean ± standard error over the "
            "seed pairs (std / √n)."), ""]
    for d in datasets:
        for t in ("white-box", "black-box"):
            g = rows[(rows.dataset == d) & (rows.threat == t)]
            psnr, psnr_se, n = paired_gap(g, FP16, TWO_BIT, "psnr")
            if n == 0:
                out.append(f"* **{d}, {t}**: not measured (no strong-attacker rows of both identity fp16 and "
                           "RD-FSQ b=2 for one seed).")
                continue
            ssim, ssim_se, _ = paired_gap(g, FP16, TWO_BIT, "ssim")
            acc, acc_se, n_acc = paired_gap(g, FP16, TWO_BIT, "acc")
            out.append(f"* **{d}, {t}**: **{verdict(psnr, 100 * acc)}**. PSNR gap {_pm(psnr, psnr_se, 2, True)} dB, "
                       f"SSIM gap {_pm(ssim, ssim_se, 3, True)}, accuracy loss {_pm(100 * acc, 100 * acc_se, 2, True)} "
                       f"points; n = {n} seed pair{'s' if n != 1 else ''}"
                       + (" (no standard error from one pair)" if n == 1 else "")
                       + (f", {n_acc} with an accuracy" if n_acc != n else "") + ".")
    return out


# ----------------------------------------------------------------------------- the defences
def defence_attacker(df: pd.DataFrame, dataset: str = "faces") -> str:
    """``strong`` when ``dataset`` has strong white-box rows on the 1x pool, else ``weak``."""
    g = df[(df.dataset == dataset) & (df.threat == "white-box") & (df.public_scale == 1)]
    return "strong" if (g.attacker == "strong").any() else "weak"


def _family(r: pd.Series) -> str | None:
    """Which defence a setting belongs to (``None``: none of the three, e.g. noise and NoPeek together)."""
    two_bit = r.method == TWO_BIT["method"] and r.bits == TWO_BIT["bits"]
    if r.sigma == 0 and r["clip"] == 0 and r.nopeek == 0:
        if two_bit:
            return "reference"
        return "bits" if r.method in ("identity", "rdfsq") else None
    if two_bit and r.sigma > 0 and r.nopeek == 0:
        return "noise"
    if two_bit and r.nopeek > 0 and r.sigma == 0 and r["clip"] == 0:
        return "nopeek"
    return None


def defence_rows(df: pd.DataFrame, dataset: str = "faces", attacker: str | None = None) -> pd.DataFrame:
    """One row per defence setting of ``dataset`` (white-box, ``attacker`` on the 1x pool;
    default :func:`defence_attacker`), with means and standard errors over seeds and the
    accuracy and PSNR differences to the undefended RD-FSQ b=2 run paired by seed."""
    attacker = attacker or defence_attacker(df, dataset)
    g = df[(df.dataset == dataset) & (df.threat == "white-box") & (df.attacker == attacker) & (df.public_scale == 1)
           & (df.text_mode == "ids")]
    ref = {**TWO_BIT, "sigma": 0.0, "clip": 0.0, "nopeek": 0.0}
    out = []
    for (m, b, sigma, clip, lam), rows in g.groupby(["method", "bits", "sigma", "clip", "nopeek"], sort=False):
        first = rows.iloc[0]
        family = _family(first)
        if family is None:
            continue
        sel = {"method": m, "bits": b, "sigma": sigma, "clip": clip, "nopeek": lam}
        seeds = rows.groupby("seed")[["acc", "psnr", "ssim"]].mean()
        n = len(seeds)
        row = {"family": family, "method": m, "bits": int(b), "sigma": float(sigma), "clip": float(clip),
               "nopeek": float(lam), "attacker": attacker, "seeds": n,
               "clip_ratio": float((rows["clip"] / rows.feature_norm_median).mean()) if clip else math.nan,
               "feature_norm_median": float(rows.feature_norm_median.mean()),
               "epsilon": float(rows.epsilon.mean()) if sigma > 0 else math.nan,
               "delta": float(rows.delta.mean()) if sigma > 0 else math.nan,
               "releases_max": float(rows.releases_max.max())}
        for col in ("acc", "psnr", "ssim"):
            row[col] = float(seeds[col].mean())
            row[f"{col}_se"] = float(seeds[col].std(ddof=1) / math.sqrt(n)) if n >= 2 else math.nan
        for col in ("acc", "psnr"):
            row[f"d_{col}"], row[f"d_{col}_se"], row[f"d_{col}_n"] = paired_gap(g, sel, ref, col)
        out.append(row)
    cols = ["family", "method", "bits", "sigma", "clip", "nopeek", "attacker", "seeds", "clip_ratio",
            "feature_norm_median", "epsilon", "delta", "releases_max", "acc", "acc_se", "psnr", "psnr_se", "ssim",
            "ssim_se", "d_acc", "d_acc_se", "d_acc_n", "d_psnr", "d_psnr_se", "d_psnr_n"]
    res = pd.DataFrame(out, columns=cols)
    order = res.family.map({f: i for i, f in enumerate(FAMILIES)})
    bits_key = np.where(res.method == "identity", 99, res.bits)
    return (res.assign(_f=order, _b=bits_key).sort_values(["_f", "sigma", "clip", "nopeek", "_b"])
            .drop(columns=["_f", "_b"]).reset_index(drop=True))


def setting_label(r: pd.Series) -> str:
    """A defence setting in words: ``σ = 0.5, C = 2``, ``λ = 0.1``, ``RD-FSQ b=1``."""
    if r.family == "noise":
        return f"σ = {r.sigma:g}, C = {r['clip']:g}" if r["clip"] else f"σ = {r.sigma:g}, no clip"
    if r.family == "nopeek":
        return f"λ = {r.nopeek:g}"
    return _method_label(r.method, r.bits)


def epsilon_cell(r: pd.Series) -> str:
    """(ε, δ) of a setting: measured for noise, ``∞`` without clipping, none for the rest."""
    if r.family == "noise":
        if math.isinf(r.epsilon) or not r["clip"]:
            return "∞ (no clip: no bound)"
        return f"{fmt_epsilon(r.epsilon)}, δ = {r.delta:g}" if not math.isnan(r.epsilon) else "–"
    return "no formal guarantee" if r.family == "nopeek" else "– (no noise)"


def defence_table(rows: pd.DataFrame, baseline_psnr: float = math.nan) -> str:
    """Markdown: one row per defence setting (:func:`defence_rows`) with C relative to the
    median feature norm, (ε, δ), accuracy, PSNR and SSIM (mean ± standard error over seeds)
    and the paired differences to the undefended RD-FSQ b=2 run."""
    if rows.empty:
        return "_(not measured: no defence rows)_"
    lines = [("| defence | setting | C / median feature norm | (ε, δ) | seeds | task accuracy (%) "
              "| Δ accuracy (points, paired) | PSNR (dB) | Δ PSNR (dB, paired) | SSIM |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        ref = r.family == "reference"
        ratio = f"{r.clip_ratio:.2f}" if not math.isnan(r.clip_ratio) else "–"
        d_acc = "0 (reference)" if ref else _pm(100 * r.d_acc, 100 * r.d_acc_se, 1, True)
        d_psnr = "0 (reference)" if ref else _pm(r.d_psnr, r.d_psnr_se, 2, True)
        lines.append(f"| {FAMILY_LABELS[r.family]} | {setting_label(r)} | {ratio} | {epsilon_cell(r)} | {r.seeds} "
                     f"| {_pm(100 * r.acc, 100 * r.acc_se, 1)} | {d_acc} | {_pm(r.psnr, r.psnr_se, 2)} | {d_psnr} "
                     f"| {_pm(r.ssim, r.ssim_se, 3)} |")
    if not math.isnan(baseline_psnr):
        lines.append(f"| *mean public image (no information)* | – | – | – | – | – | – | {baseline_psnr:.2f} | – | – |")
    return "\n".join(lines)


_MARKERS = {"noise": ("o", "tab:red"), "nopeek": ("s", "tab:green"), "bits": ("^", "tab:orange")}


def plot_defences(rows: pd.DataFrame, path: Path, baseline_psnr: float = math.nan, title: str = "faces") -> bool:
    """Task accuracy (y) vs white-box inversion PSNR (x), one marker family per defence, each
    line starting at the undefended RD-FSQ b=2 point; noise points annotated with ε. Returns
    False (and draws nothing) without rows."""
    if rows.empty:
        return False
    ref = rows[rows.family == "reference"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for family, (marker, color) in _MARKERS.items():
        g = rows[rows.family == family]
        if g.empty:
            continue
        line = pd.concat([ref, g])
        if family == "bits":  # along b, fp16 last
            line = line.iloc[np.argsort(np.where(line.method == "identity", 99, line.bits), kind="stable")]
        ax.errorbar(line.psnr, 100 * line.acc, xerr=line.psnr_se.fillna(0), yerr=100 * line.acc_se.fillna(0),
                    marker=marker, color=color, capsize=3, label=FAMILY_LABELS[family])
        for _, r in g.iterrows():
            text = f"ε={fmt_epsilon(r.epsilon)}" if family == "noise" else setting_label(r)
            if family == "noise":
                text = f"σ={r.sigma:g}, {text}"
            ax.annotate(text, (r.psnr, 100 * r.acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if len(ref):
        ax.plot(ref.psnr, 100 * ref.acc, "*", ms=12, color="black", label="RD-FSQ b=2, no defence")
    if not math.isnan(baseline_psnr):
        ax.axvline(baseline_psnr, color="grey", ls=":", label="mean image (no information)")
    attacker = rows.attacker.iloc[0]
    ax.set(xlabel=f"white-box inversion PSNR, {attacker} attacker (dB; lower is more private)",
           ylabel="task accuracy, exact match (%)", title=f"{title}: defences at RD-FSQ b=2 (mean ± s.e. over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True
