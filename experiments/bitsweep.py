"""Bit sweep: accuracy and bytes of every compressor at b = 1..5 (Quantized-TinyLLaVA, arXiv 2511.23402, Figure 3 and Tables 3-4).

``python -m experiments.bitsweep`` trains one split model per (method, bits, seed) with the
in-process reference trainer at a fixed budget, measures exact match on all clients' local
test sets (overall, and per question type on the synthetic benchmark: perception: colour,
shape, position; reasoning: count, relational), and the bytes per training sample of the
real ``train.split_step`` messages (uplink codes, downlink gradients). Two regimes
(``--regime``):

* ``finetune`` (default, the headline): split fine-tuning of the shipped checkpoint, the
  default job with 4 clients (:data:`experiments.common.FINETUNE_BUDGET`, docs/foundation.md);
  results ``bitsweep_finetune.*`` (``heldout_finetune.*`` with ``--data-path``);
* ``scratch``: random initialisation on the synthetic benchmark, 2 clients
  (:data:`experiments.common.SWEEP_BUDGET`); results ``bitsweep.*`` / ``heldout.*``.

Every configuration runs the same seeds, so the report also gives each one's accuracy
against identity paired by seed (mean ± standard error of the per-seed differences) and its
retention (accuracy over identity's; Quantized-TinyLLaVA, arXiv 2511.23402, Tables 3-4).
Data flow::

    grid of RunSpecs --run_grid (resumable, --jobs processes)--> <name>.csv (one row per run)
    <name>.csv --summarise--> <name>.md, <name>_accuracy_vs_bits.png, <name>_pareto.png

Resumable: a run whose config hash (``key``) is already in the CSV is skipped, so an
interrupted sweep continues where it stopped and ``--report-only`` rebuilds the report.
``--data-path FILE`` runs the (reduced) grid on a LLaVA-format JSON dataset instead of the
synthetic benchmark (e.g. one built by ``python -m experiments.make_heldout``).
``--quick`` is a smoke version (a few steps, 2 seeds) for CI; its accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sim.compress import get_codec  # noqa: E402
from sim.config import ConfigError, SplitConfig  # noqa: E402
from sim.run.cli import parse_overrides  # noqa: E402

from .common import (  # noqa: E402
    QTYPES,
    REGIMES,
    RunSpec,
    add_table_row,
    fmt_pm,
    make_spec,
    methods,
    regime_budget,
    run_grid,
    setup_logging,
    summarise,
    with_paired_columns,
)

log = logging.getLogger("experiments.bitsweep")

RESULTS = Path("experiments/results")
FULL_BITS = (1, 2, 3, 4, 5)
HELDOUT_BITS = (2, 4)
# vq sends one index of b bits per token (not per value): with D = 128 fp16 features per token
# the feature ratio is 2048 / b, so b = 2 is the only width here at >= 1000x (LLaVA-AlignedVQ,
# arXiv 2411.05961: 1365x at b = 12 with D = 1024); 6 and 10 bits give 341x and 205x.
VQ_BITS = (2, 6, 10)  # the widths of every codec whose bits count per token
SEEDS = (0, 1, 2)
STYLE = {
    "identity": ("k", "s"), "fsq": ("tab:blue", "o"), "rdfsq": ("tab:red", "D"), "nf": ("tab:green", "^"),
    "topk": ("tab:purple", "v"), "vq": ("tab:orange", "*"),
}
OTHER_STYLES = (("tab:brown", "P"), ("tab:pink", "X"), ("tab:olive", "h"), ("tab:cyan", "p"), ("tab:gray", "8"))


def style(method: str) -> tuple[str, str]:
    """Colour and marker of a method (a codec added later gets one of :data:`OTHER_STYLES`)."""
    if method in STYLE:
        return STYLE[method]
    others = [m for m in methods() if m not in STYLE]
    return OTHER_STYLES[others.index(method) % len(OTHER_STYLES)] if method in others else ("gray", "o")


def value_methods() -> list[str]:
    """The methods whose ``bits`` count per feature value (the accuracy-vs-bits curves)."""
    return [m for m in methods() if get_codec(m).bit_unit == "value"]


def method_bits(method: str, bits: list[int], token_bits: list[int]) -> list[int]:
    """The widths a method is swept at: ``bits`` per value (within its range), ``token_bits``
    per token, or its fixed width (16)."""
    codec = get_codec(method)
    if codec.bit_unit is None:
        return [16]
    lo, hi = codec.bit_range
    return [b for b in (token_bits if codec.bit_unit == "token" else bits) if lo <= b <= hi]


# Run first, for every seed: what the claims in docs/results.md compare (identity, the RD-FSQ
# curve, every method at 2 bits, vq at its smallest width); then the rest of the grid.
def _first(method: str, b: int, vq_bits: list[int]) -> bool:
    unit = get_codec(method).bit_unit
    return unit is None or method == "rdfsq" or b == 2 or (unit == "token" and b == min(vq_bits))


def build_grid(methods: list[str], bits: list[int], vq_bits: list[int], seeds: list[int], clients: int,
               base: dict[str, object], dataset: str) -> list[RunSpec]:
    """The claim-critical configurations for all seeds first, then the rest; seed-major within
    each part, so an interrupted sweep has seed spreads where the claims need them."""
    cells = [(m, b) for m in methods for b in method_bits(m, bits, vq_bits)]
    order = [c for c in cells if _first(*c, vq_bits)] + [c for c in cells if not _first(*c, vq_bits)]
    parts = (order[: sum(_first(*c, vq_bits) for c in cells)], order[sum(_first(*c, vq_bits) for c in cells):])
    return [make_spec(dataset, m, b, seed, clients, base) for part in parts for seed in seeds for m, b in part]


# ------------------------------------------------------------------ report
def _errorbar(ax, x, g, col: str, method: str, label: str | None, **kw) -> None:
    color, marker = style(method)
    ax.errorbar(x, 100 * g[f"{col}_mean"], yerr=100 * g[f"{col}_std"].fillna(0), color=color, marker=marker,
                capsize=3, label=label, **kw)


def plot_accuracy_vs_bits(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Exact match against bits per value, per method (mean ± std over seeds); identity as a band."""
    panels = [("acc", "all questions"), ("acc_perception", "perception (colour, shape, position)"),
              ("acc_reasoning", "reasoning (count, relational)")]
    panels = [(c, t) for c, t in panels if summary[f"{c}_mean"].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (col, sub) in zip(axes[0], panels):
        ident = summary[summary.method == "identity"]
        if len(ident):
            m, s = 100 * ident[f"{col}_mean"].iloc[0], 100 * (ident[f"{col}_std"].fillna(0).iloc[0])
            ax.axhline(m, color="k", ls="--", lw=1, label="identity fp16 (16 bits)")
            ax.axhspan(m - s, m + s, color="k", alpha=0.12)
        for method in value_methods():
            g = summary[summary.method == method].sort_values("bits")
            if len(g):
                _errorbar(ax, g.bits, g, col, method, method)
        ax.set(xlabel="bits per feature value b", ylabel="exact match (%)", title=sub)
        ax.set_ylim(bottom=0)
        ax.set_xticks(sorted(summary[summary.method.isin(value_methods())].bits.unique()))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title + " (mean ± std over seeds; vq is in the Pareto plot: its b is per token)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (fewer or equal bytes and higher accuracy), by bytes."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Exact match against uplink bytes per training sample (whole reply message), with the Pareto front."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in methods():
        g = summary[summary.method == method].sort_values("bits")
        if not len(g):
            continue
        color, marker = style(method)
        ax.errorbar(g.up_wire_bytes_per_sample, 100 * g.acc_mean, yerr=100 * g.acc_std.fillna(0), ls="none",
                    color=color, marker=marker, capsize=3, label=method)
        for x, y, b in zip(g.up_wire_bytes_per_sample, 100 * g.acc_mean, g.bits):
            ax.annotate(f"{b}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    pts = list(zip(summary.up_wire_bytes_per_sample, 100 * summary.acc_mean))
    front = [pts[i] for i in pareto_front(pts)]
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", lw=1, ls=":", label="Pareto front")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set(xlabel="uplink bytes per training sample (whole train.split_step reply, log scale)",
           ylabel="exact match (%)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _invocations(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["started", "wall_s", "runs", "jobs", "argv"])


def write_report(df: pd.DataFrame, out: Path, name: str, command: str, budget: dict, clients: int,
                 errors: list[str]) -> pd.DataFrame:
    summary = with_paired_columns(summarise(df), df)
    summary = summary.assign(_m=summary.method.map(methods().index)).sort_values(["_m", "bits"]).drop(columns="_m")
    title = f"{name}: {df.dataset.iloc[0]}"
    plot_accuracy_vs_bits(summary, out / f"{name}_accuracy_vs_bits.png", title)
    plot_pareto(summary, out / f"{name}_pareto.png", title)
    summary.to_csv(out / f"{name}_summary.csv", index=False)
    inv = _invocations(out / f"{name}_invocations.csv")
    samples = int(df.samples.median())
    lines = [
        f"# {name}: accuracy and bytes per compressor and bit width",
        "",
        f"Generated by `{command}` from `{name}.csv` (one row per run; do not edit by hand).",
        "",
        f"* dataset: **{df.dataset.iloc[0]}**; {clients} clients; per run {samples} training samples "
        f"(run config: {', '.join(f'{k}={v}' for k, v in budget.items())}); in-process reference trainer "
        "(the Flower strategy's exact schedule), one torch thread per run.",
        f"* runs: {len(df)}; sum of run wall times {df.wall_s.sum() / 60:.1f} min; "
        f"driver wall time over {len(inv)} invocation(s): {inv.wall_s.sum() / 60:.1f} min.",
        "* accuracy: greedy exact match on every client's local test split (mean ± sample std over seeds, in %).",
        "* bytes per training sample: measured on the real `train.split_step` messages (reply: codes + side "
        "information + token ids; request: gradients, fp32 unless `grad-compressor` is set), not from formulas. "
        "`ratio` = identity fp16 feature bytes / this method's feature bytes (Quantized-TinyLLaVA's definition, "
        "side information included); `wire ratio` the same for the whole uplink message.",
        "* `vq`: b is the bits of one codebook index per token (codebook of 2^b entries), not per value.",
    ]
    ident = summary[summary.method == "identity"]
    if len(ident):
        r = ident.iloc[0]
        lines += ["", f"**Identity (fp16) accuracy between seeds: {fmt_pm(r.acc_mean, r.acc_std)} % "
                      f"(n = {r.seeds}); std = {100 * r.acc_std:.2f} points.** A difference counts as real here only "
                      "if it exceeds 2 std (docs/results.md). Paired by seed, Δ is this configuration minus identity on "
                      "the same seed (mean ± standard error of the paired differences), and retention is mean accuracy "
                      "over identity's on those seeds (Quantized-TinyLLaVA's Tables 3-4)."]
    lines += ["", "| method | b | seeds | exact match % | Δ vs identity, paired (pt) | retention | perception % | "
                  "reasoning % | feature B/sample | uplink B/sample | downlink B/sample | ratio | wire ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        delta = "" if r.method == "identity" or r.pairs == 0 else fmt_pm(r.delta_mean, r.delta_se)
        lines.append(
            f"| {r.method} | {r.bits} | {r.seeds} | {fmt_pm(r.acc_mean, r.acc_std)} | {delta} | "
            f"{'' if r.retention != r.retention else f'{r.retention:.3f}'} | "
            f"{fmt_pm(r.acc_perception_mean, r.acc_perception_std)} | {fmt_pm(r.acc_reasoning_mean, r.acc_reasoning_std)} | "
            f"{r.feature_bytes_per_sample:,.1f} | {r.up_wire_bytes_per_sample:,.1f} | "
            f"{r.down_wire_bytes_per_sample:,.1f} | {r.ratio:.1f}× | {r.wire_ratio:.1f}× |"
        )
    present = [q for q in QTYPES if summary[f"acc_{q}_mean"].notna().any()]
    if present and present != ["llava"]:  # a LLaVA-style dataset's questions are all one type here
        lines += ["", "Per question type (exact match %, mean ± std):", "",
                  "| method | b | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
        for _, r in summary.iterrows():
            cells = " | ".join(fmt_pm(r[f"acc_{q}_mean"], r[f"acc_{q}_std"]) for q in present)
            lines.append(f"| {r.method} | {r.bits} | {cells} |")
    lines += ["", f"![accuracy vs bits]({name}_accuracy_vs_bits.png)", "", f"![Pareto front]({name}_pareto.png)", ""]
    if errors:
        lines += ["Failed runs (no row written; a rerun retries them):", ""] + [f"* {e}" for e in errors] + [""]
    (out / f"{name}.md").write_text("\n".join(lines))
    return summary


# ------------------------------------------------------------------ CLI
def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _methods(s: str) -> list[str]:
    out = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in out if m not in methods()]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; valid: {', '.join(methods())}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bitsweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke version: tiny model, a few steps, 2 seeds, b in {1, 2}")
    p.add_argument("--data-path", help="LLaVA-format JSON dataset (held-out real data); default: the synthetic benchmark")
    p.add_argument("--methods", type=_methods, default=None,
                   help="comma-separated, default every registered codec that serves the image stream")
    p.add_argument("--bits", type=_ints, help="bits per value for the codecs whose bits count per value "
                   "(default 1..5; 2,4 with --data-path)")
    p.add_argument("--vq-bits", type=_ints, help="bits per token for the codecs whose bits count per token, e.g. vq "
                   f"(default {','.join(map(str, VQ_BITS))})")
    p.add_argument("--seeds", type=_ints, help="default 0,1,2 (0,1 with --quick)")
    p.add_argument("--regime", choices=REGIMES, default="finetune",
                   help="finetune (default): split fine-tuning of the shipped checkpoint, the default job with 4 "
                   "clients (experiments.common.FINETUNE_BUDGET); scratch: random initialisation on the synthetic "
                   "benchmark, 2 clients (SWEEP_BUDGET), the earlier results")
    p.add_argument("--clients", type=int, help="default: the regime's (4 finetune, 2 scratch)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel processes (one torch thread each)")
    p.add_argument("--out", type=Path, help="output folder (default experiments/results; runs/quick with --quick)")
    p.add_argument("--name", help="file name stem (default bitsweep, or heldout with --data-path)")
    p.add_argument("-c", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a run-config key of the regime's base config for every run (e.g. rdfsq-clip=6); "
                   "the keys are part of each run's key, so use --name to keep such a sweep apart")
    p.add_argument("--report-only", action="store_true", help="rebuild the Markdown and plots from the CSV")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    out = args.out or (Path("runs/quick") if args.quick else RESULTS)
    name = args.name or ("heldout" if args.data_path else "bitsweep") + ("_finetune" if args.regime == "finetune" else "")
    base, clients = regime_budget(args.regime, args.quick)
    try:
        extra = parse_overrides(args.set)
        SplitConfig.from_run_config({**base, **extra})  # a bad key or value stops here, before any run
    except ConfigError as err:
        print(f"error: -c: {err}", file=sys.stderr)
        return 2
    base.update(extra)
    clients = args.clients or clients
    dataset = str(base.get("dataset", "synthetic"))
    if args.data_path:
        path = Path(args.data_path).expanduser().resolve()
        if not path.is_file():
            print(f"error: --data-path {args.data_path!r} is not a file", file=sys.stderr)
            return 2
        base.update({"dataset": "llava-json", "data-path": str(path)})
        dataset = f"llava-json:{path.parent.name}/{path.name}"
    bits = args.bits or ([1, 2] if args.quick else list(HELDOUT_BITS if args.data_path else FULL_BITS))
    vq_bits = args.vq_bits or ([2] if args.quick else list(VQ_BITS[:1] if args.data_path else VQ_BITS))
    seeds = args.seeds or ([0, 1] if args.quick else list(SEEDS))
    errors: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{name}.csv"
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--report-only", "-v", "--verbose")]
    command = " ".join(["python -m experiments.bitsweep", *shown])  # the sweep, even when only the report is rebuilt
    specs = build_grid(list(args.methods or methods()), bits, vq_bits, seeds, clients, base, dataset)
    if not args.report_only:
        t0, load0 = time.time(), os.getloadavg()[0]
        done = [0]

        def progress(row: dict) -> None:
            done[0] += 1
            log.info("[%d] %s b=%s seed=%s: exact match %.3f, uplink %.1f B/sample, %.0f s",
                     done[0], row["method"], row["bits"], row["seed"], row["acc"], row["up_wire_bytes_per_sample"], row["wall_s"])

        previous = signal.signal(signal.SIGTERM, _terminate)  # a kill still records this invocation's wall time
        try:
            errors += run_grid(specs, csv_path, args.jobs, progress)
        finally:
            signal.signal(signal.SIGTERM, previous)
            inv = out / f"{name}_invocations.csv"
            row = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)), "wall_s": round(time.time() - t0, 1),
                   "runs": done[0], "jobs": args.jobs, "argv": " ".join(argv if argv is not None else sys.argv[1:]),
                   "load_1m_at_start": round(load0, 2)}  # other jobs on the machine slow every run down
            add_table_row(inv, row)
    if not csv_path.exists():
        print(f"error: no results in {csv_path}", file=sys.stderr)
        return 1
    df = pd.read_csv(csv_path, dtype={"key": str})
    df = df[df.key.isin({s.key() for s in specs})]  # rows of other budgets or grids in the same file are not this sweep
    if df.empty:
        print(f"error: {csv_path} holds no run of this grid", file=sys.stderr)
        return 1
    write_report(df, out, name, command, base, clients, errors)
    print(f"wrote {out / (name + '.md')} ({len(df)} runs)")
    return 1 if errors and not args.report_only and any("not run" not in e for e in errors) else 0


if __name__ == "__main__":
    raise SystemExit(main())
