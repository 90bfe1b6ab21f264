"""Error feedback for the downlink gradient codec (``grad-error-feedback=true``).

Error feedback (Seide et al., "1-Bit Stochastic Gradient Descent and its Application to
Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014; analysed by
Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression
Schemes", arXiv 1901.09847) adds what the compressor dropped last time to what it
compresses next::

    t = g + e;   sent = decode(encode(t));   e <- t - sent

The server keeps one residual ``e`` per client and stream. A message carries the
gradients of an exchange's micro-batches as one tensor (``(S, N, D)``: ``steps-per-
exchange`` micro-batches of ``B`` samples), and the residual of that message is added to
the next message's tensor of the same shape: micro-batch ``j``'s residual goes to
micro-batch ``j`` of the next exchange. A residual whose shape differs from the next
gradient's (the last, shorter exchange of a round; the text stream's rows, whose count
changes with the text) is dropped, and every client starts each round with none, so a
resumed run equals an uninterrupted one. The wire format does not change: the client
decodes what it gets as without error feedback.

What it can and cannot do here (docs/compressors.md, "Error feedback"): in data-parallel
SGD the residual belongs to the same parameter tensor at every step. Here the gradient
is dL/dy for the features of *different samples* at every step, so the residual of one
sample is added to another sample's gradient: it is not the same tensor across steps,
and the compressor's error is carried into another sample's update rather than into a
later update of the same quantity.
"""

from __future__ import annotations

import torch


class ErrorFeedback:
    """One client's residuals, per stream (kept on the server)."""

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def corrected(self, stream: str, g: torch.Tensor) -> torch.Tensor:
        """``g`` plus the stream's residual when it has ``g``'s shape, else ``g``."""
        e = self.residual.get(stream)
        if e is None or e.shape != g.shape:
            self.residual.pop(stream, None)
            return g
        return g + e

    def update(self, stream: str, target: torch.Tensor, sent: torch.Tensor) -> None:
        """Keep ``target - sent``: what the codec did not deliver of ``target``."""
        self.residual[stream] = (target.detach().float() - sent.detach().float().reshape(target.shape)).cpu()

    def reset(self) -> None:
        self.residual.clear()
