"""The privacy report's tables, plots and example grid, built only from the study's files
(:func:`experiments.privacy_text.write_report` puts them together).

Inputs: ``privacy.csv`` (one row per victim configuration x threat model x attacker x
public-pool scale, written by :mod:`experiments.inversion`), ``privacy_curves.csv`` (the
strong attacker's learning curves), ``privacy_config.json`` (the budget) and the example
reconstructions (``<victim>.npz``: ``truth`` and one array per threat model, uint8; the
strong attacker's as ``<threat>-strong``). Outputs in the results folder: ``privacy.md``,
``privacy_summary.csv`` (mean and std over seeds), ``privacy_psnr_vs_bits.png``,
``privacy_utility.png``, ``privacy_psnr_vs_bytes.png``, ``privacy_learning_curves.png``
and ``privacy_examples_pathology.png``. The faces grid goes next to the examples (kept out
of the repository: the faces are real people). The bits, bytes and noise plots and tables
show the weak (fixed-budget) attacker, as they always did; the strong attacker has its own
columns, table and curves. Every table and plot here takes the rows of one regime; those
that are not about a defence show the undefended runs only (:func:`undefended`), the noise
ones no NoPeek runs (:func:`noise_view`).

Error bars and "±": the standard deviation over seeds of the per-seed means when a
configuration has 2 or more seeds; with a single seed, the standard error over the
victim's held-out images (``std / sqrt(n)``), marked as such.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

METHOD_ORDER = ("identity", "rdfsq", "fsq", "nf", "topk", "vq")
LABELS = {"identity": "identity fp16", "rdfsq": "RD-FSQ", "fsq": "FSQ", "nf": "NF (blockwise)", "topk": "top-k",
          "vq": "AlignedVQ"}
COLORS = {"identity": "tab:blue", "rdfsq": "tab:orange", "fsq": "tab:green", "nf": "tab:purple",
          "topk": "tab:brown", "vq": "tab:cyan"}
GRID_ROWS = (("identity", 16), ("rdfsq", 1), ("rdfsq", 2), ("rdfsq", 3), ("vq", 8))


# ----------------------------------------------------------------------------- summaries
NEW_COLUMNS = ("prompt_exact_recovery", "public_images", "decoder_steps", "best_step", "val_psnr", "stopped_early",
               "epsilon", "delta", "releases_max", "feature_norm_median")


def with_attacker_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of a CSV written before the strong attacker (no ``attacker``/``public_scale``
    columns) read as the weak attacker on the 1x pool (``none`` for the mean image), and rows
    written before the fine-tuning regime, clipping and NoPeek as ``regime=scratch``,
    ``clip=0``, ``nopeek=0``, as :mod:`experiments.privacy_rows` upgrades them."""
    df = df.copy()
    df["regime"] = df.get("regime", pd.Series("", index=df.index)).fillna("").replace("", "scratch")
    for col in ("clip", "nopeek"):
        df[col] = df.get(col, pd.Series(0.0, index=df.index)).fillna(0.0).astype(float)
    if "attacker" not in df:
        df["attacker"] = ""
    df["attacker"] = df.attacker.fillna("").where(df.attacker.fillna("") != "",
                                                  np.where(df.threat == "mean-image", "none", "weak"))
    df["public_scale"] = df.get("public_scale", pd.Series(1, index=df.index)).fillna(1).astype(int)
    for col in NEW_COLUMNS:
        if col not in df:
            df[col] = np.nan
    for col in ("epsilon", "delta", "releases_max", "feature_norm_median"):  # blank: not applicable
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


SUMMARY_KEYS = ["regime", "dataset", "method", "bits", "sigma", "clip", "nopeek", "text_mode", "threat", "attacker",
                "public_scale"]


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (regime, dataset, method, bits, sigma, clip, nopeek, text mode, threat,
    attacker, public scale): means and spreads over seeds; ``epsilon`` is the mean over seeds
    (every seed has the same), ``releases_max`` the largest."""
    rows = []
    for (r, d, m, b, s, c, lam, tm, t, a, sc), g in df.groupby(SUMMARY_KEYS, sort=False):
        n = len(g)
        row = {"regime": r, "dataset": d, "method": m, "bits": int(b), "sigma": float(s), "clip": float(c),
               "nopeek": float(lam), "text_mode": tm, "threat": t, "attacker": a, "public_scale": int(sc), "seeds": n,
               "epsilon": float(g.epsilon.mean()), "delta": float(g.delta.mean()),
               "releases_max": float(g.releases_max.max()), "feature_norm_median": float(g.feature_norm_median.mean()),
               "bytes_per_image": float(g.feature_bytes_per_image.mean()),
               "val_psnr": float(g.val_psnr.mean()), "decoder_steps": float(g.decoder_steps.mean()),
               "best_step": float(g.best_step.mean()),
               "stopped_early": _flags(g.stopped_early).mean()}
        for col, std_col in (("psnr", "psnr_std"), ("ssim", "ssim_std"), ("acc", None)):
            row[col] = float(g[col].mean())
            if n >= 2:
                row[f"{col}_err"], row[f"{col}_err_kind"] = float(g[col].std(ddof=1)), "seeds"
            elif std_col is not None:
                row[f"{col}_err"] = float(g[std_col].iloc[0] / math.sqrt(g.n_images.iloc[0]))
                row[f"{col}_err_kind"] = "images"
            else:
                row[f"{col}_err"], row[f"{col}_err_kind"] = math.nan, ""
        rows.append(row)
    return pd.DataFrame(rows)


def _flags(col: pd.Series) -> pd.Series:
    """A True/False column as read back from CSV (bools, strings or blanks) as 1.0/0.0/NaN."""
    return col.map(lambda v: {True: 1.0, False: 0.0, "True": 1.0, "False": 0.0}.get(v, np.nan)).astype(float)


def weak_view(s: pd.DataFrame) -> pd.DataFrame:
    """The summary rows of the weak attacker and the mean-image baseline (the 1x public pool)."""
    return s[s.attacker.isin(("weak", "none")) & (s.public_scale == 1)]


def strong_view(s: pd.DataFrame, scale: int = 1) -> pd.DataFrame:
    """The summary rows of the strong attacker on the ``scale`` x public pool."""
    return s[(s.attacker == "strong") & (s.public_scale == scale)]


def undefended(s: pd.DataFrame) -> pd.DataFrame:
    """The rows (raw or summary) without any defence: no feature noise, no clipping, no NoPeek."""
    return s[(s.sigma == 0) & (s["clip"] == 0) & (s.nopeek == 0)]


def noise_view(s: pd.DataFrame) -> pd.DataFrame:
    """The feature-noise rows (any clip) and the undefended ones, without NoPeek or clipping alone."""
    return s[(s.nopeek == 0) & ((s.sigma > 0) | (s["clip"] == 0))]


def _pm(mean: float, err: float, digits: int, scale: float = 1.0, kind: str = "") -> str:
    if mean != mean:
        return "–"
    if err != err:
        return f"{mean * scale:.{digits}f}"
    mark = "†" if kind == "images" else ""
    return f"{mean * scale:.{digits}f} ± {err * scale:.{digits}f}{mark}"


def _method_label(m: str, b: int) -> str:
    return LABELS.get(m, m) if m == "identity" else f"{LABELS.get(m, m)} b={b}"


def _order(s: pd.DataFrame) -> pd.DataFrame:
    key = s.method.map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(99)
    return s.assign(_k=key).sort_values(["_k", "bits", "sigma"]).drop(columns="_k")


# ----------------------------------------------------------------------------- tables
def _cell(sub: pd.DataFrame, m: str, b: int, threat: str, col: str, digits: int) -> str:
    """``weak / strong`` (1x public pool) values of ``col`` for one method/bits and threat."""
    out = []
    for view in (weak_view(sub), strong_view(sub)):
        g = view[(view.method == m) & (view.bits == b) & (view.threat == threat)]
        out.append(_pm(g[col].iloc[0], g[f"{col}_err"].iloc[0], digits, kind=g[f"{col}_err_kind"].iloc[0])
                   if len(g) else "–")
    return " / ".join(out)


def attack_table(s: pd.DataFrame, dataset: str, sigma: float = 0.0, methods: tuple[str, ...] | None = None,
                 max_bits: int | None = None) -> str:
    """Markdown: one row per method/bits with bytes, task accuracy and each threat's PSNR/SSIM
    as ``weak / strong`` (both on the 1x public pool); no NoPeek, and no clipping at ``sigma`` 0."""
    sub = s[s.dataset == dataset]
    sub = undefended(sub) if sigma == 0 else sub[(sub.sigma == sigma) & (sub.nopeek == 0)]
    if methods is not None:
        sub = sub[sub.method.isin(methods)]
    if max_bits is not None:
        sub = sub[(sub.bits <= max_bits) | (sub.method == "identity") | (sub.method == "vq")]
    lines = ["| method | feature bytes / image | seeds | task accuracy (%) | white-box PSNR (dB), weak / strong "
             "| white-box SSIM, weak / strong | black-box PSNR (dB), weak / strong | black-box SSIM, weak / strong |",
             "|---|---|---|---|---|---|---|---|"]
    weak = weak_view(sub)
    base = weak[weak.threat == "mean-image"]
    for (m, b), g in _order(weak[weak.threat == "white-box"]).groupby(["method", "bits"], sort=False):
        wb = g.iloc[0]
        lines.append(
            f"| {_method_label(m, b)} | {wb.bytes_per_image:,.0f} | {wb.seeds} | {_pm(wb.acc, wb.acc_err, 1, 100)} "
            f"| {_cell(sub, m, b, 'white-box', 'psnr', 2)} | {_cell(sub, m, b, 'white-box', 'ssim', 3)} "
            f"| {_cell(sub, m, b, 'black-box', 'psnr', 2)} | {_cell(sub, m, b, 'black-box', 'ssim', 3)} |")
    if len(base):
        lines.append(f"| *mean public image (no information)* | 0 | – | – | {base.psnr.mean():.2f} "
                     f"| {base.ssim.mean():.3f} | {base.psnr.mean():.2f} | {base.ssim.mean():.3f} |")
    return "\n".join(lines)


def scale_table(s: pd.DataFrame, dataset: str) -> str:
    """Markdown: per method/bits and threat, the weak attacker's PSNR and the strong one's at
    every public-pool scale measured, with the strong fits' mean steps at 1x (undefended runs)."""
    sub = undefended(s[(s.dataset == dataset) & (s.threat != "mean-image")])
    scales = sorted(set(sub[sub.attacker == "strong"].public_scale))
    if not scales:
        return "_(no strong-attacker runs)_"
    head = "| method | threat | weak PSNR (dB) | " + " | ".join(f"strong PSNR, {k}x public (dB)" for k in scales)
    lines = [head + " | strong: steps to the best weights, 1x |", "|---|---|---|" + "---|" * (len(scales) + 1)]
    weak = weak_view(sub)
    for (m, b, t), g in _order(sub).groupby(["method", "bits", "threat"], sort=False):
        w = weak[(weak.method == m) & (weak.bits == b) & (weak.threat == t)]
        cells = [_pm(w.psnr.iloc[0], w.psnr_err.iloc[0], 2, kind=w.psnr_err_kind.iloc[0]) if len(w) else "–"]
        for k in scales:
            st = g[(g.attacker == "strong") & (g.public_scale == k)]
            cells.append(_pm(st.psnr.iloc[0], st.psnr_err.iloc[0], 2, kind=st.psnr_err_kind.iloc[0]) if len(st) else "–")
        one = g[(g.attacker == "strong") & (g.public_scale == 1)]
        steps = f"{one.best_step.iloc[0]:,.0f}" if len(one) and one.best_step.iloc[0] == one.best_step.iloc[0] else "–"
        lines.append(f"| {_method_label(m, b)} | {t} | " + " | ".join(cells) + f" | {steps} |")
    return "\n".join(lines)


def noise_table(s: pd.DataFrame, dataset: str) -> str:
    """Markdown: white-box PSNR/SSIM and accuracy along σ for every method/bits with noise runs
    (the clip bound C as a column when some run clips; no NoPeek rows)."""
    sub = noise_view(s[(s.dataset == dataset) & (s.threat == "white-box")])
    noisy = sub[sub.sigma > 0]
    if noisy.empty:
        return "_(no feature-noise runs)_"
    keep = {(m, b) for m, b in zip(noisy.method, noisy.bits)}
    sub = _order(sub[[(m, b) in keep for m, b in zip(sub.method, sub.bits)]])
    clipped = bool((noisy["clip"] > 0).any())
    lines = ["| method | σ |" + (" C |" if clipped else "") + " seeds | task accuracy (%) | white-box PSNR (dB) "
             "| white-box SSIM |", "|---|---|" + ("---|" if clipped else "") + "---|---|---|---|"]
    for _, r in sub.iterrows():
        clip = f" {r['clip']:g} |" if clipped else ""
        lines.append(f"| {_method_label(r.method, r.bits)} | {r.sigma:g} |{clip} {r.seeds} "
                     f"| {_pm(r.acc, r.acc_err, 1, 100)} "
                     f"| {_pm(r.psnr, r.psnr_err, 2, kind=r.psnr_err_kind)} | {_pm(r.ssim, r.ssim_err, 3, kind=r.ssim_err_kind)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _mean_image_line(ax, s: pd.DataFrame, dataset: str) -> None:
    """The no-information baseline (mean public image) of ``dataset`` as a dotted line."""
    base = s[(s.dataset == dataset) & (s.threat == "mean-image")]
    if len(base):
        ax.axhline(base.psnr.mean(), color="grey", ls=":", label="mean image (no information)")


def _save(fig, path: Path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_psnr_vs_bits(s: pd.DataFrame, path: Path) -> None:
    datasets = [d for d in ("faces", "pathology", "retina") if d in set(s.dataset)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        sub = undefended(s[(s.dataset == d) & (s.threat == "white-box")])
        for m in METHOD_ORDER:
            g = sub[(sub.method == m)].sort_values("bits")
            if g.empty or m in ("identity", "vq"):  # fp16 is a line; vq's bits are per token (bytes plot)
                continue
            ax.errorbar(g.bits, g.psnr, yerr=g.psnr_err, marker="o", capsize=3, label=LABELS[m], color=COLORS[m])
        ident = sub[sub.method == "identity"]
        if len(ident):
            ax.axhline(ident.psnr.iloc[0], color=COLORS["identity"], ls="--", label="identity fp16")
        _mean_image_line(ax, s, d)
        bb = undefended(s[(s.dataset == d) & (s.threat == "black-box") & (s.method == "rdfsq")]).sort_values("bits")
        if len(bb):
            ax.errorbar(bb.bits, bb.psnr, yerr=bb.psnr_err, marker="s", ls="-.", capsize=3, color=COLORS["rdfsq"],
                        mfc="white", label="RD-FSQ, black-box")
        ax.set(xlabel="bits per feature value (b)", ylabel="inversion PSNR (dB; white-box unless marked)",
               title=f"{d}: inversion PSNR vs bits")
        ax.set_xticks(sorted(set(sub[~sub.method.isin(("identity", "vq"))].bits)) or [1, 2, 3, 4])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_utility(s: pd.DataFrame, path: Path) -> None:
    """Privacy/utility: task accuracy (x) vs white-box inversion PSNR (y), one line per
    method/bits (and clip bound C) along sigma, from the undefended point."""
    sub = noise_view(s[(s.threat == "white-box")])
    noisy = sub[sub.sigma > 0]
    datasets = sorted(set(noisy.dataset)) or sorted(set(sub.dataset))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.6 * len(datasets), 4.2), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        dn = sub[sub.dataset == d]
        dnoisy = dn[dn.sigma > 0]
        keys = sorted(set(zip(dnoisy.method, dnoisy.bits, dnoisy["clip"])),
                      key=lambda k: (METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else 99, k[1], k[2]))
        for m, b, c in keys:
            g = dn[(dn.method == m) & (dn.bits == b) & ((dn["clip"] == c) | (dn.sigma == 0))].sort_values("sigma")
            ax.errorbar(100 * g.acc, g.psnr, xerr=100 * g.acc_err.fillna(0), yerr=g.psnr_err, marker="o", capsize=3,
                        label=_method_label(m, b) + (f", C={c:g}" if c else ""))
            for _, r in g.iterrows():
                ax.annotate(f"σ={r.sigma:g}", (100 * r.acc, r.psnr), fontsize=6, xytext=(3, 3), textcoords="offset points")
        _mean_image_line(ax, s, d)
        ax.set(xlabel="task accuracy, exact match on all clients' test sets (%)",
               ylabel="white-box inversion PSNR (dB)", title=f"{d}: privacy/utility across bits × σ")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_psnr_vs_bytes(s: pd.DataFrame, path: Path) -> None:
    sub = undefended(s[s.threat == "white-box"])
    datasets = [d for d in ("faces", "pathology", "retina") if d in set(sub.dataset)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        dn = sub[sub.dataset == d]
        for m in METHOD_ORDER:
            g = dn[dn.method == m].sort_values("bytes_per_image")
            if len(g):
                ax.errorbar(g.bytes_per_image, g.psnr, yerr=g.psnr_err, marker="o", capsize=3, label=LABELS[m],
                            color=COLORS[m])
        ax.set_xscale("log")
        ax.set(xlabel="compressed feature bytes per image (log scale)", ylabel="white-box inversion PSNR (dB)",
               title=f"{d}: leakage vs bandwidth")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_learning_curves(curves: pd.DataFrame, path: Path) -> bool:
    """The strong attacker's learning curves in one figure: the image decoders' training MSE,
    their validation PSNR (one panel per dataset; one line per fit: colour = method, dashed =
    black-box, thicker = larger public pool; a dot at the kept weights) and, with
    ``text-mode=quantized`` runs, the text reader's validation token accuracy. Returns False
    when there are no curves."""
    if curves.empty:
        return False
    image, text = curves[curves.target == "image"], curves[curves.target == "text"]
    datasets = [d for d in ("faces", "pathology", "retina") if d in set(image.dataset)]
    panels = 1 + len(datasets) + bool(len(text))
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    ax_loss, seen = axes[0, 0], set()
    for _, g in image.groupby("key", sort=False):
        g = g.sort_values("step")
        r = g.iloc[0]
        ls = ":" if r.get("attacker") == "converged" else "--" if r.threat == "black-box" else "-"
        style = {"color": COLORS.get(r.method, "grey"), "ls": ls,
                 "lw": 0.6 + 0.4 * math.log2(max(1, int(r.public_scale))), "alpha": 0.7}
        ax_loss.plot(g.step, g.train_loss, **style, label=None if r.method in seen else LABELS.get(r.method, r.method))
        seen.add(r.method)
        ax = axes[0, 1 + datasets.index(r.dataset)]
        ax.plot(g.step, g.val_psnr, **style)
        best = g.loc[g.val_psnr.idxmax()]
        ax.plot(best.step, best.val_psnr, "o", ms=3, color=style["color"])
    ax_loss.set(xlabel="decoder step", ylabel="training MSE (mean since the last evaluation)", yscale="log",
                title="strong image decoder: training loss")
    ax_loss.legend(fontsize=7, title="solid white-box, dashed black-box,\nthicker: larger public pool,\n"
                   "dotted: the longer (converged) rule",
                   title_fontsize=7)
    for i, d in enumerate(datasets, 1):
        axes[0, i].set(xlabel="decoder step", ylabel="PSNR on held-out public images (dB)",
                       title=f"{d}: validation PSNR (dot: kept weights)")
    if len(text):
        ax = axes[0, -1]
        for _, g in text.groupby("key", sort=False):
            g = g.sort_values("step")
            ax.plot(g.step, 100 * g.val_token_accuracy, lw=0.6 + 0.4 * math.log2(max(1, int(g.public_scale.iloc[0]))),
                    color=COLORS.get(g.method.iloc[0], "grey"))
        ax.set(xlabel="reader step", ylabel="question tokens read, held-out public prompts (%)",
               title="text-mode=quantized: learned text reader")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def example_grid(examples: Path, dataset: str, path: Path, seed: int = 0) -> bool:
    """Originals (top row) and white-box reconstructions per method (one row each), plus the
    black-box identity row; returns False when the example files are missing."""
    rows = [("original", None, "truth")]
    for m, b in GRID_ROWS:
        rows.append((f"{_method_label(m, b)}\nwhite-box", f"{dataset}-{m}-b{b}-s0-seed{seed}.npz", "white-box"))
    rows.append(("identity fp16\nblack-box", f"{dataset}-identity-b16-s0-seed{seed}.npz", "black-box"))
    for m, b in (("identity", 16), ("rdfsq", 1)):
        for threat in ("white-box", "black-box"):
            rows.append((f"{_method_label(m, b)}\n{threat}, strong", f"{dataset}-{m}-b{b}-s0-seed{seed}.npz",
                         f"{threat}-strong"))
    first = examples / f"{dataset}-identity-b16-s0-seed{seed}.npz"
    if not first.exists():
        return False
    truth = np.load(first)["truth"]
    imgs = []
    for label, name, key in rows:
        if name is None:
            imgs.append((label, truth))
            continue
        f = examples / name
        if f.exists() and key in np.load(f).files:
            imgs.append((label, np.load(f)[key]))
    k = truth.shape[0]
    fig, axes = plt.subplots(len(imgs), k, figsize=(1.1 * k + 1.4, 1.15 * len(imgs)), squeeze=False)
    for r, (label, arr) in enumerate(imgs):
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(arr[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"{dataset}: victim's held-out images (top) and inversions from the captured uplink", fontsize=9)
    _save(fig, path, dpi=130)
    return True
