"""Verdicts on the seed papers' claims, from the experiment results: writes ``docs/results.md``.

``python -m experiments.claims`` reads what the drivers wrote under ``--results``
(``bitsweep_finetune{,_summary}.csv`` and ``heldout_finetune{,_summary}.csv``: the fine-tuning
regime, listed first; ``foundation/foundation.json``; ``bitsweep_summary.csv``,
``heldout_summary.csv``: the from-scratch regime; ``entropy.json``, ``comm.csv``,
``comm_inference.csv``, ``comm_jpeg.csv``, ``comm_jpeg_accuracy.csv``, ``traffic_summary.csv``)
and decides each claim by a fixed rule (:class:`Judge`):

* fine-tuning regime (every configuration runs the same seeds): a difference counts only
  if the mean of the per-seed differences exceeds the half-width of its two-sided 95 %
  t-interval;
* from-scratch regime: an accuracy difference counts only if it exceeds **2 std**, where
  std is the larger of the identity baseline's seed std and the compared configurations'
  seed stds on the same dataset;
* with fewer than 2 seeds the verdict is "undetermined";
* byte counts are deterministic (measured on real messages), so byte claims are
  compared directly.

Verdicts: ``reproduced``, ``partly`` (some of the claim's parts hold), ``not
reproduced``, or ``undetermined`` (the results needed are missing).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy.stats import t as t_dist

from .common import fmt_pm, paired_difference

FT_SWEEP_CMD = "python -m experiments.bitsweep"
# The default job fine-tunes on pathology already, so the fine-tuning regime's held-out sweep uses
# the other real-image case study (fundus photographs).
FT_HELDOUT_CMD = ("python -m experiments.make_heldout --kind retina && python -m experiments.bitsweep "
                  "--data-path runs/heldout/retina/data.json")
FOUNDATION_CMD = "python -m experiments.foundation"
SWEEP_CMD = "python -m experiments.bitsweep --regime scratch"
HELDOUT_CMD = ("python -m experiments.make_heldout && python -m experiments.bitsweep --regime scratch "
               "--data-path runs/heldout/pathology/data.json")
RETENTION_TARGET = 0.98  # issue 16: split fine-tuning keeps >= 98 % of centralised fine-tuning's accuracy
ENTROPY_CMD = "python -m experiments.entropy"
COMM_CMD = "python -m experiments.comm"
TRAFFIC_CMD = "python -m experiments.traffic"
TRAFFIC_TARGET = 32.0  # issue 17: total traffic per training sample >= 32x below fp16 up / fp32 down at <= 1 point
PAPER_VQ_MAX_DROP = 0.0223  # LLaVA-AlignedVQ: within -2.23% .. +1.6% of the original model


@dataclass
class Verdict:
    claim: str
    source: str
    number: str
    verdict: str
    command: str
    detail: str = ""


class Results:
    """The result files of one results folder; a missing file reads as empty."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sweep = self._csv("bitsweep_summary.csv")
        self.heldout = self._csv("heldout_summary.csv")
        self.sweep_ft, self.runs_ft = self._csv("bitsweep_finetune_summary.csv"), self._csv("bitsweep_finetune.csv")
        self.heldout_ft, self.heldout_runs_ft = self._csv("heldout_finetune_summary.csv"), self._csv("heldout_finetune.csv")
        p = folder / "foundation" / "foundation.json"
        self.foundation = json.loads(p.read_text()) if p.exists() else None
        self.comm = self._csv("comm.csv")
        self.inference = self._csv("comm_inference.csv")
        self.jpeg = self._csv("comm_jpeg.csv")
        self.jpeg_accuracy = self._csv("comm_jpeg_accuracy.csv")
        self.traffic = self._csv("traffic_summary.csv")
        p = folder / "entropy.json"
        self.entropy = json.loads(p.read_text()) if p.exists() else None

    def _csv(self, name: str) -> pd.DataFrame:
        p = self.folder / name
        try:
            return pd.read_csv(p) if p.exists() else pd.DataFrame()
        except pd.errors.EmptyDataError:  # e.g. comm.csv of a run with --no-flower
            return pd.DataFrame()


def _row(s: pd.DataFrame, method: str, bits: int) -> pd.Series | None:
    if s.empty:
        return None
    g = s[(s.method == method) & (s.bits == bits)]
    return g.iloc[0] if len(g) else None


def _identity(s: pd.DataFrame) -> pd.Series | None:
    return _row(s, "identity", 16)


def noise(s: pd.DataFrame, *rows: pd.Series | None) -> float:
    """The std a difference is compared with: max of identity's and the rows' seed std (NaN if none)."""
    stds = [r.acc_std for r in (_identity(s), *rows) if r is not None and r.acc_std == r.acc_std]
    return max(stds) if stds else math.nan


def too_few_seeds(*rows: pd.Series | None) -> bool:
    """A comparison needs a seed spread for every configuration it involves."""
    return any(r is None or r.seeds < 2 for r in rows)


def acc(r: pd.Series) -> str:
    return f"{fmt_pm(r.acc_mean, r.acc_std)} %"


class Judge:
    """How an accuracy difference between two configurations of one results table is judged.

    Unpaired (``runs`` None, the from-scratch regime): the difference of the seed means
    counts if it exceeds 2 std (:func:`noise`). Paired (``runs``: the per-run rows, the
    fine-tuning regime): the mean of the per-seed differences counts if it exceeds the
    half-width of its two-sided 95 % t-interval, ``t(0.975, n-1) * s.e.`` (n = the seeds both ran)."""

    def __init__(self, s: pd.DataFrame, runs: pd.DataFrame | None = None) -> None:
        self.s = s
        self.runs = runs if runs is not None and not runs.empty else None

    @property
    def paired(self) -> bool:
        return self.runs is not None

    @property
    def bar(self) -> str:
        return "95 % CI" if self.paired else "2 std"

    def margin(self, a: pd.Series, b: pd.Series) -> tuple[float, float]:
        """``a - b`` in accuracy and the threshold it must exceed to count (NaN: undefined)."""
        if not self.paired:
            return float(a.acc_mean - b.acc_mean), 2 * noise(self.s, a, b)
        d, se, n = paired_difference(self.runs, (a.method, int(a.bits)), (b.method, int(b.bits)))
        return d, float(t_dist.ppf(0.975, n - 1) * se) if n > 1 else math.nan


# ------------------------------------------------------------------ the claims
def rdfsq_beats_fsq(s: pd.DataFrame, label: str, command: str, runs: pd.DataFrame | None = None) -> Verdict:
    claim = "RD-FSQ beats FSQ at 2 bits (Quantized-TinyLLaVA, arXiv 2511.23402, Fig. 3, Table 3)"
    judge = Judge(s, runs)
    a, b = _row(s, "rdfsq", 2), _row(s, "fsq", 2)
    if a is None or b is None:
        return Verdict(claim, label, "–", "undetermined", command, "rdfsq or fsq at b = 2 missing")
    d, bar = judge.margin(a, b)
    paired = " paired by seed" if judge.paired else ""
    number = f"rdfsq {acc(a)} vs fsq {acc(b)}: Δ = {100 * d:+.1f} points{paired} ({judge.bar} = ±{100 * bar:.1f})"
    if bar != bar or too_few_seeds(a, b, _identity(s)):
        return Verdict(claim, label, number, "undetermined", command, "fewer than 2 seeds")
    verdict = "reproduced" if d > bar else "not reproduced" if d < -bar else "not reproduced (within noise)"
    return Verdict(claim, label, number, verdict, command)


def optimum_bits(s: pd.DataFrame, entropy: dict | None, label: str, command: str,
                 runs: pd.DataFrame | None = None) -> Verdict:
    claim = "RD-FSQ's optimum sits at 2–3 bits, consistent with the entropy estimate (Quantized-TinyLLaVA, arXiv 2511.23402, §4.2.1, Table 2, Fig. 3)"
    judge = Judge(s, runs)
    g = s[s.method == "rdfsq"].sort_values("bits") if not s.empty else s
    if len(g) < 3:
        return Verdict(claim, label, "–", "undetermined", command, "rdfsq needs at least 3 bit widths")
    best = g.loc[g.acc_mean.idxmax()]
    margins = {int(r.bits): judge.margin(best, r) for _, r in g.iterrows() if r.bits != best.bits}
    sd = 0.0 if all(bar == bar for _, bar in margins.values()) else math.nan
    plateau = sorted([int(best.bits)] + [b for b, (d, bar) in margins.items() if d <= bar]) if sd == sd else [int(best.bits)]
    rec = entropy.get("recommended_bits") if entropy else None
    h = entropy["trained"]["scaled"]["pooled_mean"] if entropy else math.nan
    curve = ", ".join(f"b={int(r.bits)}: {fmt_pm(r.acc_mean, r.acc_std)}" for _, r in g.iterrows())
    number = f"exact match % {curve}; best b = {int(best.bits)}; within {judge.bar} of the best: b ∈ {plateau}; "
    if rec is not None:
        conn = entropy["trained"]["connector"]
        number += (f"entropy of the quantiser's scaled input: h = {h:.2f} bits → b = {rec} (on the unscaled connector "
                   f"output, the paper-like {conn['pooled_mean']:.2f} bits → b = {conn['recommended_bits']})")
    else:
        number += "no entropy result"
    if sd != sd or too_few_seeds(*[r for _, r in g.iterrows()]):
        return Verdict(claim, label, number, "undetermined", command, "fewer than 2 seeds for some bit width")
    peak = int(best.bits) in (2, 3) and min(plateau) in (2, 3)
    consistent = rec is not None and rec in plateau and min(plateau) in (2, 3)
    verdict = "reproduced" if peak and consistent else "partly" if peak or consistent else "not reproduced"
    detail = ("peak at 2–3 bits: " + ("yes" if peak else "no") + "; entropy's b on the plateau: "
              + ("yes" if consistent else "no" if rec is not None else "no entropy result"))
    return Verdict(claim, label, number, verdict, command + (" and " + ENTROPY_CMD if rec is not None else ""), detail)


def topk_worst(s: pd.DataFrame, label: str, command: str, runs: pd.DataFrame | None = None) -> Verdict:
    claim = "Top-K sparsification is the worst method at equal compression (Quantized-TinyLLaVA, arXiv 2511.23402, Tables 3–4)"
    judge = Judge(s, runs)
    if s.empty or not (s.method == "topk").any():
        return Verdict(claim, label, "–", "undetermined", command, "no topk results")
    others = ("fsq", "rdfsq", "nf")
    worst, lowest, cells = 0, 0, []
    bits = sorted(s[s.method == "topk"].bits.unique())
    for b in bits:
        t = _row(s, "topk", int(b))
        rest = [r for m in others if (r := _row(s, m, int(b))) is not None]
        if not rest or too_few_seeds(t, *rest):
            continue
        margin = min(r.acc_mean for r in rest) - t.acc_mean
        lowest += margin > 0
        worst += all(d > bar for d, bar in (judge.margin(r, t) for r in rest))
        cells.append(f"b={int(b)}: {100 * margin:+.1f}")
    n = len(cells)
    if not n:
        return Verdict(claim, label, "–", "undetermined", command, "no bit width with >= 2 seeds of topk and another method")
    number = (f"topk is the lowest at {lowest}/{n} bit widths and lower than every other method by > {judge.bar} at {worst}/{n} "
              f"(margin to the next-worst, points: {', '.join(cells)})")
    verdict = "reproduced" if worst == n and n else "partly" if worst else "not reproduced"
    return Verdict(claim, label, number, verdict, command, "compared at the same b (the paper's equal nominal rate; "
                   "topk's true bytes are higher, see the Pareto plot)")


def uplink_reduction(s: pd.DataFrame, comm: pd.DataFrame, label: str) -> Verdict:
    claim = "2-bit codes cut the uplink by 87.5% against fp16 (Quantized-TinyLLaVA, arXiv 2511.23402, Table 1: 16/b = 8×)"
    a, i = _row(s, "rdfsq", 2), _identity(s)
    if a is None or i is None:
        return Verdict(claim, label, "–", "undetermined", SWEEP_CMD, "rdfsq b=2 or identity missing")
    feat = 1 - a.feature_bytes_per_sample / i.feature_bytes_per_sample
    wire = 1 - a.up_wire_bytes_per_sample / i.up_wire_bytes_per_sample
    both = 1 - (a.up_wire_bytes_per_sample + a.down_wire_bytes_per_sample) / (
        i.up_wire_bytes_per_sample + i.down_wire_bytes_per_sample)
    number = (f"features {100 * feat:.2f}%; whole uplink message {100 * wire:.2f}%; one exchange, both directions "
              f"(fp32 gradients down) {100 * both:.1f}%")
    command = SWEEP_CMD
    if not comm.empty and {"identity", "rdfsq"} <= set(comm.method):
        ci, cr = comm[comm.method == "identity"].iloc[0], comm[(comm.method == "rdfsq") & (comm.bits == 2)]
        if len(cr):
            cr = cr.iloc[0]
            number += (f"; whole Flower training run: uplink {100 * (1 - cr.uplink_bytes / ci.uplink_bytes):.1f}%, "
                       f"all traffic {100 * (1 - cr.total_bytes / ci.total_bytes):.1f}%")
            command += " and " + COMM_CMD
    verdict = "reproduced" if feat >= 0.875 - 1e-9 else "partly" if wire > 0.8 else "not reproduced"
    detail = ("bytes are deterministic (no seed spread). The claim holds for the features; the downlink gradients "
              "(fp32, uncompressed, as in Quantized-TinyLLaVA's public code) are untouched, so the total traffic falls far less.")
    return Verdict(claim, label, number, verdict, command, detail)


def both_directions(t: pd.DataFrame) -> Verdict:
    """Issue 17's target on the fine-tuning regime (``experiments.traffic``): the best total-traffic
    ratio whose mean paired accuracy cost is at most 1 point, against 32x."""
    claim = (f"Compressing both directions cuts the total traffic per training sample ≥ {TRAFFIC_TARGET:.0f}× below fp16 up / "
             "fp32 down at ≤ 1 point of accuracy (SplitFC, arXiv 2307.10805, reports 320× and FedLite up to 490× "
             "against vanilla split learning)")
    label = "pathology, fine-tuning from the checkpoint"
    if t.empty or "diff_mean" not in t:
        return Verdict(claim, label, "–", "undetermined", TRAFFIC_CMD, "traffic_summary.csv missing")
    from .traffic import best_within

    if int(t.seeds.min()) < 2:
        return Verdict(claim, label, "–", "undetermined", TRAFFIC_CMD, "fewer than 2 seeds")
    best = {pts: best_within(t, pts) for pts in (1, 3)}
    parts = [f"≤ {pts} pt: " + ("none" if b is None else f"{b.ratio:.1f}× ({b.up} / {b.down}, "
             f"Δ {100 * b.diff_mean:+.2f} ± {100 * b.diff_se:.2f} pt)") for pts, b in best.items()]
    top = t.sort_values("ratio").iloc[-1]
    parts.append(f"largest measured: {top.ratio:.1f}× ({top.up} / {top.down}, Δ {100 * top.diff_mean:+.2f} pt)")
    ratio = best[1].ratio if best[1] is not None else 0.0
    verdict = "reproduced" if ratio >= TRAFFIC_TARGET else "partly" if ratio >= TRAFFIC_TARGET / 4 else "not reproduced"
    detail = ("paired by seed against fp16 / fp32; bytes are every message of the run in both directions, weights and "
              "evaluation included (experiments/results/traffic.md has the byte breakdown and what limits the ratio).")
    return Verdict(claim, label, "; ".join(parts), verdict, TRAFFIC_CMD, detail)


def vq_ratio(s: pd.DataFrame, label: str, command: str, runs: pd.DataFrame | None = None) -> Verdict:
    """Compound claim: the ratio (deterministic bytes) and a small accuracy cost at that ratio.

    Among the vq widths at >= 1000x, the best one decides: ``reproduced`` if its mean drop
    against identity is at most the paper's 2.23 points and no other method beats it by more
    than 2 std (else identity is no upper bound and flatters vq: ``partly``); ``not
    reproduced`` if the drop is larger and exceeds 2 std; ``undetermined`` if it is larger
    but within 2 std (too noisy to say); ``not reproduced`` if no width reaches 1000x."""
    claim = "VQ reaches ≥ 1000× compression at a small accuracy cost (LLaVA-AlignedVQ: 1365×, −2.23 … +1.6%)"
    judge = Judge(s, runs)
    i = _identity(s)
    g = s[s.method == "vq"].sort_values("bits") if not s.empty else s
    if i is None or g.empty:
        return Verdict(claim, label, "–", "undetermined", command, "no vq or identity results")
    g = g[g.seeds >= 2]
    if g.empty or too_few_seeds(i):
        return Verdict(claim, label, "–", "undetermined", command, "vq or identity has fewer than 2 seeds")
    ratio = {int(r.bits): i.feature_bytes_per_sample / r.feature_bytes_per_sample for _, r in g.iterrows()}
    cells = [f"b={int(r.bits)}: {ratio[int(r.bits)]:,.0f}×, {fmt_pm(r.acc_mean, r.acc_std)} % "
             f"(Δ {100 * (r.acc_mean - i.acc_mean):+.1f})" for _, r in g.iterrows()]
    number = f"identity {acc(i)}; vq " + "; ".join(cells)
    best = s[(s.method != "vq") & (s.seeds >= 2)].sort_values("acc_mean").iloc[-1]
    if best.method != "identity":
        number += f"; best other method {best.method} b={int(best.bits)}: {acc(best)}"
    big = g[[ratio[int(b)] >= 1000 for b in g.bits]]
    detail = ("ratio = identity fp16 feature bytes / vq feature bytes, measured; with D = 128 per token it is 2048/b, "
              "so only b ≤ 2 reaches 1000× (the paper's D = 1024 gives 1365× at b = 12). Small cost: a mean drop of at "
              "most 2.23 points (the paper's largest). ")
    if big.empty:
        return Verdict(claim, label, number, "not reproduced", command, detail + "No vq width reached 1000×.")
    r = big.loc[big.acc_mean.idxmax()]
    drop, bar = judge.margin(i, r)
    if drop <= PAPER_VQ_MAX_DROP:
        if best.method != "identity" and (m := judge.margin(best, r))[0] > m[1]:
            return Verdict(claim, label, number, "partly", command, detail + (
                f"The cost is small against identity, but {best.method} b={int(best.bits)} beats vq by more than "
                f"{judge.bar}: identity is no upper bound here and the comparison with it flatters vq."))
        return Verdict(claim, label, number, "reproduced", command, detail)
    if drop > bar:
        return Verdict(claim, label, number, "not reproduced", command, detail + f"The drop exceeds the {judge.bar}.")
    return Verdict(claim, label, number, "undetermined", command, detail + (
        f"The mean drop ({100 * drop:.1f} points) is large but within the {judge.bar} (±{100 * bar:.1f}): the seeds "
        "disagree too much."))


def accuracy_beside_jpeg(runs: pd.DataFrame, cloud: pd.DataFrame) -> str:
    """One-seed exact match of the split runs of ``comm`` beside the cloud-only JPEG baseline."""
    if cloud.empty:
        return "no cloud-only JPEG accuracy in the results"
    parts = [f"split {r.method} b={int(r.bits)} {100 * r.accuracy:.1f}%" for _, r in runs.iterrows()] if len(runs) else []
    parts += [f"cloud-only {r.format} {100 * r.accuracy:.1f}%" for _, r in cloud.iterrows()]
    return ("exact match, one Flower run each, so no verdict on accuracy: " + ", ".join(parts)
            + " (the cloud-only rows are the identity run's model fed JPEG round-tripped test images)")


def vq_vs_jpeg(inference: pd.DataFrame, jpeg: pd.DataFrame, runs: pd.DataFrame | None = None,
               cloud: pd.DataFrame | None = None) -> Verdict:
    claim = "AlignedVQ sends 96.8% fewer bytes per image than JPEG-90 (LLaVA-AlignedVQ, arXiv 2411.05961, Table 3)"
    if inference.empty or jpeg.empty or not (inference.method == "vq").any():
        return Verdict(claim, "benchmark images", "–", "undetermined", COMM_CMD, "no vq inference or JPEG results")
    bench = jpeg[jpeg.images.str.startswith("benchmark") & (jpeg.format == "JPEG-90")]
    paper = jpeg[jpeg.images.str.startswith("paper scale")]
    photos = jpeg[jpeg.images.str.contains("photos") & (jpeg.format == "JPEG-90")]
    vq = inference[inference.method == "vq"].sort_values("bits")
    cells = [f"vq b={int(r.bits)}: {r.feature_bytes:,.1f} B vs JPEG-90 {bench.bytes_mean.iloc[0]:,.0f} B → "
             f"{100 * (1 - r.feature_bytes / bench.bytes_mean.iloc[0]):.1f}%" for _, r in vq.iterrows()]
    number = "; ".join(cells)
    if len(paper) == 2 and len(photos):
        vq12 = paper[paper.format.str.startswith("VQ")].bytes_mean.iloc[0]
        number += (f"; paper scale: 577 12-bit indices {vq12:.0f} B vs JPEG-90 of 336×336 photos "
                   f"{photos.bytes_mean.iloc[0]:,.0f} B → {100 * (1 - vq12 / photos.bytes_mean.iloc[0]):.1f}%")
    red = [1 - r.feature_bytes / bench.bytes_mean.iloc[0] for _, r in vq.iterrows()]
    verdict = "reproduced" if max(red) >= 0.968 else "partly" if max(red) > 0 else "not reproduced"
    detail = "codes only, as the paper's table"
    if cloud is not None:
        detail += "; " + accuracy_beside_jpeg(runs if runs is not None else pd.DataFrame(), cloud)
    return Verdict(claim, "benchmark images", number, verdict, COMM_CMD, detail)


def retention(foundation: list[dict] | None) -> Verdict:
    """Issue 16's target (``experiments.foundation``): split fine-tuning with RD-FSQ at 2 bits
    keeps >= 98 % of centralised fine-tuning's accuracy (same checkpoint, same steps, identity
    features, no split), mean over seeds, with the paired difference."""
    claim = (f"Split fine-tuning with 2-bit RD-FSQ keeps ≥ {100 * RETENTION_TARGET:.0f} % of centralised fine-tuning's "
             "accuracy (retention as in Quantized-TinyLLaVA, arXiv 2511.23402, Tables 3–4)")
    label = "pathology, fine-tuning from the checkpoint"
    if not foundation:
        return Verdict(claim, label, "–", "undetermined", FOUNDATION_CMD, "experiments/results/foundation/foundation.json missing")
    split = [r["split"] for r in foundation]
    central = [r["centralized"] for r in foundation]
    d = [a - b for a, b in zip(split, central)]
    ret = sum(split) / sum(central)
    se = (pd.Series(d).std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    number = (f"split {100 * sum(split) / len(split):.1f} % vs centralised {100 * sum(central) / len(central):.1f} % "
              f"({len(d)} seeds): retention {ret:.3f}; paired Δ {100 * sum(d) / len(d):+.2f} ± {100 * se:.2f} pt (s.e.)")
    if len(d) < 2:
        return Verdict(claim, label, number, "undetermined", FOUNDATION_CMD, "fewer than 2 seeds")
    verdict = "reproduced" if ret >= RETENTION_TARGET else "not reproduced"
    return Verdict(claim, label, number, verdict, FOUNDATION_CMD,
                   "docs/results-foundation.md has the per-seed table, the convergence check and where the gap comes from.")


# ------------------------------------------------------------------ report
FT_LABEL = "pathology, fine-tuning from the checkpoint"


def sweeps(results: Results) -> list[tuple[pd.DataFrame, pd.DataFrame | None, str, str]]:
    """Each bit sweep's summary, its per-run rows (paired verdicts) or None (unpaired), its label
    and command: the fine-tuning regime first (the headline), then the from-scratch regime."""
    return [
        (results.sweep_ft, results.runs_ft, FT_LABEL, FT_SWEEP_CMD),
        (results.heldout_ft, results.heldout_runs_ft, "held-out (LLaVA JSON), fine-tuning from the checkpoint", FT_HELDOUT_CMD),
        (results.sweep, None, "synthetic, from scratch", SWEEP_CMD),
        (results.heldout, None, "held-out (LLaVA JSON), from scratch", HELDOUT_CMD),
    ]


def build(results: Results) -> list[Verdict]:
    out = []
    if results.foundation:
        out.append(retention(results.foundation))
    for s, runs, label, cmd in sweeps(results):
        if s.empty:
            continue
        out.append(rdfsq_beats_fsq(s, label, cmd, runs))
        if not label.startswith("held-out"):
            out.append(optimum_bits(s, results.entropy if runs is None else None, label, cmd, runs))
        out.append(topk_worst(s, label, cmd, runs))
        if label == "synthetic, from scratch":
            out.append(uplink_reduction(s, results.comm, label))
        out.append(vq_ratio(s, label, cmd, runs))
    out.append(vq_vs_jpeg(results.inference, results.jpeg, results.comm, results.jpeg_accuracy))
    if not results.traffic.empty:
        out.append(both_directions(results.traffic))
    return out


def _load(value) -> str:
    """A recorded 1-minute load average, or "not recorded" (invocations before it was recorded)."""
    return "not recorded" if value is None or value != value else f"{float(value):.2f}"


def _wall_times(folder: Path) -> list[str]:
    lines, total = [], 0.0
    for name, cmd in (("bitsweep_finetune", FT_SWEEP_CMD), ("heldout_finetune", FT_HELDOUT_CMD), ("bitsweep", SWEEP_CMD),
                      ("heldout", HELDOUT_CMD), ("traffic", TRAFFIC_CMD)):
        p = folder / f"{name}_invocations.csv"
        rows = folder / f"{name}.csv"
        if rows.exists():
            runs = pd.read_csv(rows)
            inv = pd.read_csv(p) if p.exists() else pd.DataFrame({"wall_s": [], "runs": []})
            loads = ", ".join(_load(v) for v in inv.get("load_1m_at_start", pd.Series([None] * len(inv))))
            lines.append(f"| `{cmd}` | {len(runs)} runs in the CSV; their wall times sum to {runs.wall_s.sum() / 60:.0f} min "
                         f"({runs.wall_s.mean():.0f} s per run on average, `--jobs` runs at a time); finished driver invocations: "
                         f"{inv.wall_s.sum() / 60:.1f} min over {len(inv)} | {loads or 'not recorded'} |")
            total += float(inv.wall_s.sum())
    for name, cmd in (("entropy.json", ENTROPY_CMD), ("comm.json", COMM_CMD)):
        p = folder / name
        if p.exists():
            d = json.loads(p.read_text())
            runs_min = (d.get("flower_runs_wall_s") or 0) / 60
            if not runs_min:
                extra = ""
            elif d["wall_s"] / 60 >= runs_min:  # the Flower runs were made by this invocation
                extra = f", of which {runs_min:.1f} min its Flower training runs"
            else:
                extra = f" (last invocation, reusing Flower training runs that took {runs_min:.1f} min when made)"
            lines.append(f"| `{cmd}` | {d['wall_s'] / 60:.1f} min{extra} | {_load(d.get('load_1m_at_start'))} |")
            total += max(d["wall_s"], (d.get("flower_runs_wall_s") or 0))  # reused Flower runs count as made
    if lines:
        lines.append(f"| all of the above | {total / 60:.1f} min | |")
    return lines


def write(verdicts: list[Verdict], results: Results, path: Path, command: str) -> None:
    rel = Path("..") / results.folder if not results.folder.is_absolute() else results.folder
    lines = [
        "# Results: the seed papers' claims on our benchmark",
        "",
        f"Generated by `{command}` from the files in `{results.folder}` (each made by the command in the table); "
        "do not edit by hand. Papers: Quantized-TinyLLaVA (RD-FSQ; arXiv 2511.23402), LLaVA-AlignedVQ (arXiv 2411.05961).",
        "",
        "Two regimes. **Fine-tuning from the checkpoint** (the headline; the papers' regime): the default job, split "
        "fine-tuning of the shipped pretrained tiny VLM (`checkpoints/tiny-vlm`) on the pathology case study, 4 clients "
        "(docs/foundation.md). **From scratch** (the earlier results, kept as a second regime): random "
        "initialisation on the synthetic benchmark, 2 clients, undertrained by construction (docs/results-spine.md).",
        "",
        "Rules. Fine-tuning regime: seeds are paired (every configuration runs the same seeds), and a difference "
        "counts only if the mean of the per-seed differences exceeds the half-width of its two-sided 95 % t-interval. "
        "From-scratch regime: a difference counts only if it exceeds 2 std, std being the larger of the identity "
        "baseline's seed std and the compared configurations' seed stds on the same dataset. Byte counts are "
        "measured on real messages and deterministic.",
        "",
        "| claim | data | our number (mean ± std over seeds) | verdict | command |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        lines.append(f"| {v.claim} | {v.source} | {v.number} | **{v.verdict}** | `{v.command}` |")
    lines += ["", "Notes:", ""]
    for v in verdicts:
        if v.detail:
            lines.append(f"* {v.claim} ({v.source}): {v.detail}")
    for s, runs, label, _ in sweeps(results):
        i = _identity(s)
        if i is not None:
            lines.append(f"* identity (fp16) exact match between seeds, {label}: {acc(i)} "
                         f"(std {100 * i.acc_std:.2f} points, {int(i.seeds)} seeds).")
            judge = Judge(s, runs)
            better = pd.DataFrame([r for _, r in s[(s.method != "identity") & (s.seeds >= 2)].iterrows()
                                   if (m := judge.margin(r, i))[0] > m[1]]) if runs is not None else \
                s[(s.method != "identity") & (s.seeds >= 2) & (s.acc_mean - s.acc_std.fillna(0) * 2 > i.acc_mean)]
            if len(better):
                lines.append(f"* {label}: identity is **not an upper bound** at this budget — "
                             + ", ".join(f"{r.method} b={int(r.bits)} ({acc(r)})" for _, r in better.iterrows())
                             + (" beat it beyond the paired 95 % CI; \"small accuracy cost against identity\" is "
                                "therefore an easy bar." if runs is not None else
                                " beat it by more than 2 of their own std. The fp16 features reach the LLM without the "
                                "per-dimension normalisation RD-FSQ applies, which here speeds up learning; \"small "
                                "accuracy cost against identity\" is therefore an easy bar."))
    walls = _wall_times(results.folder)
    if walls:
        lines += ["", "Wall time of each command on this 2-core machine. Other jobs on the machine slow a command down: "
                  "the 1-minute load average when each invocation started is beside it (about 2 = both cores already "
                  "busy).", "",
                  "| command | wall time | load average at start |", "|---|---|---|", *walls]
    lines += ["", "Details: " + ", ".join(f"[{n}]({rel / n})" for n in ("foundation/foundation.md", "bitsweep_finetune.md",
                                                                          "heldout_finetune.md", "bitsweep.md", "heldout.md",
                                                                          "entropy.md", "comm.md", "traffic.md")
                                          if (results.folder / n).exists()), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.claims", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("experiments/results"))
    p.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = p.parse_args(argv)
    if not args.results.is_dir():
        print(f"error: results folder {args.results} does not exist", file=sys.stderr)
        return 2
    results = Results(args.results)
    verdicts = build(results)
    command = ("python -m experiments.claims " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    write(verdicts, results, args.out, command)
    for v in verdicts:
        print(f"{v.verdict:>32}  {v.claim} [{v.source}]")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
