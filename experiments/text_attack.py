"""The strong text attacker: a learned decoder from the quantised text stream back to question tokens.

CapRecover (Xiu & Zhang, "CapRecover: A Cross-Modality Feature Inversion Attack Framework
on Vision Language Models", arXiv 2507.22828) trains a decoder from what crosses the split
to text, with cross-entropy on public data. With ``text-mode=quantized`` the text stream
carries the question tokens themselves, as quantised embeddings, so the decoder reads the
tokens back, position by position, with a little context::

    public prompts --client half, text codec, server unpack (experiments.attack.encoded_prompts)--> (L_i, D)
      standardise, Linear(D->H), 2 residual Conv1d(k=3) blocks, Linear(H->V): logits per token
      cross-entropy; early stopping on the token accuracy of held-out public prompts
      (experiments.early_stopping)
    victim's decoded prompts --argmax--> token ids, scored by experiments.privacy_capture.text_recovery

It replaces the weak attacker's nearest-centroid reading (:class:`experiments.attack.TextInverter`)
with a trained one on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.early_stopping import LearningCurve, StopRule, train_until_plateau


@dataclass(frozen=True)
class TextDecoderBudget:
    """Adam at ``lr`` on batches of ``batch`` prompts until ``stop`` ends it (score: token accuracy, 0-1)."""

    stop: StopRule = field(default_factory=lambda: StopRule(max_steps=2000, eval_every=25, patience=5,
                                                            min_delta=0.001, lr_drops=1))
    batch: int = 64
    lr: float = 3e-3
    hidden: int = 128


class TextDecoder(nn.Module):
    """(B,L,D) decoded text vectors + (B,L) mask -> (B,L,V) token logits."""

    def __init__(self, dim: int, vocab_size: int, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Conv1d(hidden, hidden, 3, padding=1) for _ in range(2))
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask[..., None].to(x.dtype)
        h = self.inp((x - self.mu) / self.sd) * keep
        for conv in self.blocks:  # padding positions stay zero, so they add no context
            h = h + conv(F.gelu(h).transpose(1, 2)).transpose(1, 2) * keep
        return self.out(F.gelu(h))

    @torch.no_grad()
    def read(self, decoded: torch.Tensor) -> np.ndarray:
        """(L, D) decoded prompt vectors of one sample -> (L,) token ids."""
        x = decoded.float()[None]
        return self(x, torch.ones(x.shape[:2], dtype=torch.bool)).argmax(-1)[0].numpy()


def _padded(vecs: list[torch.Tensor], ids: list[np.ndarray] | None = None):
    """Right-pad to the longest: x (B,L,D), mask (B,L) and, with ``ids``, targets (B,L) (-100 on padding)."""
    longest = max(len(v) for v in vecs)
    x = torch.zeros(len(vecs), longest, vecs[0].shape[1])
    mask = torch.zeros(len(vecs), longest, dtype=torch.bool)
    y = torch.full((len(vecs), longest), -100, dtype=torch.int64)
    for i, v in enumerate(vecs):
        x[i, :len(v)], mask[i, :len(v)] = v, True
        if ids is not None:
            y[i, :len(v)] = torch.as_tensor(np.asarray(ids[i], dtype=np.int64))
    return x, mask, y


def token_accuracy(dec: TextDecoder, vecs: list[torch.Tensor], ids: list[np.ndarray]) -> float:
    """Share of the tokens of ``ids`` that ``dec`` reads back from ``vecs``."""
    x, mask, y = _padded(vecs, ids)
    with torch.no_grad():
        hit = (dec(x, mask).argmax(-1) == y) & mask
    return float(hit.sum()) / max(1, int(mask.sum()))


def fit_text_decoder(vecs: list[torch.Tensor], ids: list[np.ndarray], val_vecs: list[torch.Tensor],
                     val_ids: list[np.ndarray], vocab_size: int, budget: TextDecoderBudget,
                     seed: int) -> tuple[TextDecoder, LearningCurve]:
    """Fit on public prompts (``vecs[i]`` (L_i, D) decoded, ``ids[i]`` its L_i token ids) until
    the token accuracy on the held-out public prompts ``val_*`` stops improving; returns the
    decoder with the best validation weights and its curve (``val_score``: token accuracy)."""
    if len(vecs) != len(ids) or len(vecs) < 2 or len(val_vecs) != len(val_ids) or not len(val_vecs):
        raise ValueError(f"need matching training ({len(vecs)}, {len(ids)}) and validation "
                         f"({len(val_vecs)}, {len(val_ids)}) prompts")
    x, mask, y = _padded(vecs, ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = TextDecoder(x.shape[2], vocab_size, budget.hidden)
        flat = torch.cat(vecs)
        dec.mu.copy_(flat.mean(0))
        dec.sd.copy_(flat.std(0).clamp_min(1e-6))
        opt = torch.optim.Adam(dec.parameters(), lr=budget.lr)
        gen = torch.Generator().manual_seed(seed)

        def step() -> float:
            idx = torch.randint(len(x), (min(budget.batch, len(x)),), generator=gen)
            logits = dec(x[idx], mask[idx])
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        curve = train_until_plateau(dec, opt, step, lambda: token_accuracy(dec, val_vecs, val_ids), budget.stop)
    return dec, curve
