"""The AlignedVQ split inside the vision tower: ``split-point=vit-ln1:k``.

LLaVA-AlignedVQ (arXiv 2411.05961) section 3.2.1 quantises the output of LayerNorm 1 of ViT block
``k``. A pre-LN SigLIP block computes::

    x' = x + Attn(LN1(x));   out = x' + MLP(LN2(x'))

so the client (:class:`VisionHead`) runs the patch embeddings, blocks ``0..k-1`` and
``LN1`` of block ``k``, and hands over ``h = LN1(x)`` and the residual stream ``x``.
The server (:class:`VisionTail`) runs the rest of block ``k`` (attention on the
decoded ``h``, the residual add, ``LN2`` and the MLP), blocks ``k+1..``, and the
post-LayerNorm. The residual ``x`` is not in ``h`` (LayerNorm drops each token's mean
and scale), so the server either rebuilds it from the decoded features
(``residual-mode=rebuild``: ``x_hat = h_hat``, what the paper's byte count implies)
or receives a separately compressed copy (``residual-mode=transmit``).

With both streams sent losslessly, ``VisionTail(h, x)`` equals the unsplit tower's
``last_hidden_state`` (``tests/test_vit_split.py`` checks it against
``SiglipVisionModel``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, SiglipVisionModel


def _vision_body(tower: PreTrainedModel, k: int) -> nn.Module:
    if not isinstance(tower, SiglipVisionModel):
        raise ValueError(f"split-point vit-ln1:{k} needs a SigLIP vision tower, got {type(tower).__name__}")
    body = getattr(tower, "vision_model", tower)
    blocks = len(body.encoder.layers)
    if not 0 <= k < blocks:
        raise ValueError(f"split-point vit-ln1:{k} is outside the tower's {blocks} blocks")
    return body


class VisionHead(nn.Module):
    """Client side: ``pixels (B,3,H,W) -> (x, LN1_k(x))``, both ``(B,N,Dv)``."""

    def __init__(self, tower: PreTrainedModel, k: int) -> None:
        super().__init__()
        body = _vision_body(tower, k)
        self.config = tower.config
        self.embeddings = body.embeddings
        self.layers = nn.ModuleList(body.encoder.layers[:k])
        self.ln1 = body.encoder.layers[k].layer_norm1

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x, None)
        return x, self.ln1(x)


class VisionTail(nn.Module):
    """Server side: ``(h_hat, x_hat) -> last_hidden_state (B,N,Dv)`` (rest of block k onward)."""

    def __init__(self, tower: PreTrainedModel, k: int) -> None:
        super().__init__()
        body = _vision_body(tower, k)
        block = body.encoder.layers[k]
        self.attn, self.ln2, self.mlp = block.self_attn, block.layer_norm2, block.mlp
        self.layers = nn.ModuleList(body.encoder.layers[k + 1 :])
        self.post = body.post_layernorm

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = residual + self.attn(hidden_states=h, attention_mask=None)[0]
        x = x + self.mlp(self.ln2(x))
        for layer in self.layers:
            x = layer(x, None)
        return self.post(x)
