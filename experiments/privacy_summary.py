"""The privacy report's summary for a privacy officer: what the server learns, what 2-bit
compression does and does not protect, and what each defence costs, in plain words with
every number read from the rows of one regime. It opens ``privacy.md`` and is copied
between two markers into ``docs/privacy.md`` (:func:`write_between_markers`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from experiments.privacy_attacker_text import _pct, _reading
from experiments.privacy_defences import (
    FP16,
    TWO_BIT,
    _attack_rows,
    _select,
    defence_rows,
    epsilon_cell,
    fmt_epsilon,
    setting_label,
)

START = "<!-- privacy-officer-summary:start -->"
END = "<!-- privacy-officer-summary:end -->"
HEADING = "## Summary for a privacy officer"
RECOGNISABLE_SSIM = 0.5  # this summary's rule of thumb: at SSIM >= 0.5 a reconstruction still shows the image


def _mean(df: pd.DataFrame, sel: dict[str, object], col: str) -> float:
    g = _select(df, sel)
    return float(g[col].mean()) if len(g) else math.nan


def _text_line(df: pd.DataFrame) -> str:
    ids, q = df[df.text_mode == "ids"], df[df.text_mode == "quantized"]
    out = ("**Questions, answers and labels.** With the default `text-mode=ids` the server reads every question, "
           "every answer and so every label in the clear")
    if len(ids):
        out += (f" (measured: {_pct(ids.prompt_token_recovery.mean())} of the question words and "
                f"{_pct(ids.answer_recovery.mean())} of the answers)")
    reader = _reading(q[q.public_scale == 1], "strong")
    name = "a reader the server trains on public questions"
    if reader.empty:
        reader, name = _reading(q, "weak"), "a simple nearest-match reader"
    if len(reader):
        out += (f". With `text-mode=quantized` the questions are disguised, yet {name} recovers "
                f"{_pct(reader.prompt_token_recovery.mean())} of their words")
    else:
        out += ". `text-mode=quantized` (disguised questions) was not measured"
    return out + ("; in both modes the answers, which are the labels (e.g. whether a photo shows a face), go up "
                  "in the clear.")


def _image_lines(df: pd.DataFrame) -> list[str]:
    rows = _attack_rows(df, "strong")
    who = "strongest attacker measured"
    if rows[rows.threat == "white-box"].empty:
        rows, who = _attack_rows(df, "weak"), "attacker measured"
    base_rows = df[df.threat == "mean-image"]
    datasets = [d for d in ("faces", "pathology") if d in set(df.dataset)]
    out = [(f"**Images.** How closely the {who}, who knows the model (white-box), rebuilds a client's images from "
            "what it sends. PSNR in dB: higher is closer to the original; SSIM from 0 to 1: how much of the image's "
            f"structure survives (here, from {RECOGNISABLE_SSIM:g} up we call it still recognisable)."), "",
           "| data | from uncompressed (fp16) features | from 2-bit codes | guessing the average image |",
           "|---|---|---|---|"]
    verdicts = []
    for d in datasets:
        wb = rows[(rows.dataset == d) & (rows.threat == "white-box")]
        cells = []
        for sel in (FP16, TWO_BIT):
            p, s = _mean(wb, sel, "psnr"), _mean(wb, sel, "ssim")
            cells.append("not measured" if math.isnan(p) else f"{p:.1f} dB, SSIM {s:.2f}")
        bp, bs = _mean(base_rows, {"dataset": d}, "psnr"), _mean(base_rows, {"dataset": d}, "ssim")
        cells.append("–" if math.isnan(bp) else f"{bp:.1f} dB, SSIM {bs:.2f}")
        out.append(f"| {d} | " + " | ".join(cells) + " |")
        p2, s2 = _mean(wb, TWO_BIT, "psnr"), _mean(wb, TWO_BIT, "ssim")
        if math.isnan(p2):
            continue
        if s2 >= RECOGNISABLE_SSIM:
            verdicts.append(f"**{d}**: compression alone is not a defence; the images stay recognisable at 2 bits "
                            f"(SSIM {s2:.2f})")
        elif not math.isnan(bp) and p2 <= bp + 1.0:
            verdicts.append(f"**{d}**: at 2 bits the attacker does no better than guessing the average image "
                            f"(within 1 dB, SSIM {s2:.2f})")
        else:
            verdicts.append(f"**{d}**: 2 bits blur the images (SSIM {s2:.2f}) but leave "
                            + (f"{p2 - bp:+.1f} dB over guessing the average image" if not math.isnan(bp) else
                               "more than nothing"))
    if verdicts:
        out += ["", " ".join(f"{v}." for v in verdicts)]
    return out


def _defence_lines(df: pd.DataFrame, dataset: str = "faces") -> list[str]:
    rows = defence_rows(df[df.text_mode == "ids"], dataset)
    rows = rows[rows.family.isin(("reference", "noise", "nopeek"))]
    if not rows.family.isin(("noise", "nopeek")).any():
        return [f"**Defences** ({dataset}): not measured (no feature-noise or NoPeek runs)."]
    attacker = rows.attacker.iloc[0]
    out = [(f"**Defences** ({dataset}, 2-bit codes; cost and PSNR against the same run without the defence, same "
            f"seed; white-box {attacker} attacker). ε: the formal privacy budget per image, smaller is stronger; δ: "
            "the small chance the bound fails."), "",
           "| setting | (ε, δ) | accuracy cost (points) | attacker PSNR (dB) |", "|---|---|---|---|"]
    for _, r in rows.iterrows():
        name = {"reference": "no defence", "noise": "noise, " + setting_label(r),
                "nopeek": "NoPeek, " + setting_label(r)}[r.family]
        cost = "0 (reference)" if r.family == "reference" else (
            "–" if math.isnan(r.d_acc) else f"{-100 * r.d_acc:+.1f}" + (
                "" if math.isnan(r.d_acc_se) else f" ± {100 * r.d_acc_se:.1f}"))
        eps = "none" if r.family == "reference" else epsilon_cell(r)
        out.append(f"| {name} | {eps} | {cost} | {r.psnr:.1f} |")
    finite = rows[(rows.family == "noise") & rows.epsilon.map(lambda e: not math.isnan(e) and not math.isinf(e))]
    scope = ("The ε covers only the images, against a server that sees every message and cannot regenerate the "
             "noise; it does not cover the text, the labels or the shared model weights. It holds against the server "
             "only where every site sets a `noise-secret`; in these runs the noise is derived from the run seed, "
             "which the server holds.")
    if len(finite):
        scope = f"Smallest ε measured: {fmt_epsilon(finite.epsilon.min())}. " + scope
    return out + ["", scope]


def officer_summary(df: pd.DataFrame, note: str = "") -> str:
    """The summary block (heading, optional ``note`` line, body) from the raw rows ``df`` of one regime."""
    lines = [HEADING, ""] + ([note, ""] if note else [])
    lines += [_text_line(df), "", *_image_lines(df), "", *_defence_lines(df)]
    return "\n".join(lines)


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with what lies between :data:`START` and :data:`END` replaced by ``block``; without
    both markers (in that order) they are inserted with ``block`` right after the first heading
    line (at the top when there is none). Everything else is kept byte for byte."""
    i, j = text.find(START), text.find(END)
    if i >= 0 and j > i:
        return text[:i + len(START)] + "\n" + block.strip("\n") + "\n" + text[j:]
    wrapped = f"{START}\n{block.strip(chr(10))}\n{END}\n"
    lines = text.splitlines(keepends=True)
    head = next((k for k, line in enumerate(lines) if line.startswith("#")), None)
    if head is None:
        return wrapped + "\n" + text
    before, after = "".join(lines[:head + 1]), "".join(lines[head + 1:])
    if not before.endswith("\n"):
        before += "\n"
    return before + "\n" + wrapped + ("" if after.startswith("\n") else "\n") + after


def write_between_markers(path: Path, block: str) -> None:
    """Put ``block`` between the summary markers of the Markdown file ``path`` (see
    :func:`replace_between_markers`)."""
    path.write_text(replace_between_markers(path.read_text(), block))
