"""The split training step in plain PyTorch, shared by the Flower apps and the
in-process reference trainer.

One micro-batch of split learning (SplitFed: all sampled clients' micro-batches are
concatenated into one server step)::

    client  encode(pixels)              -> Encoded y (B,N,D)      [uplink: codes]
    server  train_step([y_hat_i], text) -> loss, [dL/dy_hat_i]    [downlink: grads]
    client  apply_grads(pixels, grad)   -> recompute, backward, optimiser step

Staleness with ``steps-per-exchange = S``: a client encodes S micro-batches with the
weights it has at the start of an exchange. When their gradients arrive, it
recomputes those S forwards with the *same* weights (bitwise the codes it sent),
takes the S parameter gradients, and applies S optimiser steps in order. Gradient
``s`` is therefore evaluated at weights that are ``s-1`` client steps old; with
``S = 1`` this is exact sequential split learning. The server's S steps are exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batches import TextBatch, pad_text
from .model import ClientModel, ServerModel
from .schedule import set_lr


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def client_apply_grads(
    model: ClientModel,
    opt: torch.optim.Optimizer,
    pixel_batches: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
) -> list[float]:
    """Recompute each micro-batch, backprop its received gradient plus the client's own
    auxiliary loss, then apply the optimiser steps in order (step ``s`` at rate
    ``lrs[s]``). Returns the aux losses."""
    params = trainable(model)
    per_step: list[tuple[torch.Tensor, ...]] = []
    aux_losses = []
    for pix, g in zip(pixel_batches, grads):
        enc = model(pix)
        if enc.y.shape != g.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} does not match features {tuple(enc.y.shape)}")
        surrogate = (enc.y * g).sum() + enc.aux_loss
        per_step.append(torch.autograd.grad(surrogate, params, allow_unused=True))
        aux_losses.append(float(enc.aux_loss.detach()))
    for step_grads, lr in zip(per_step, lrs, strict=True):
        for p, gp in zip(params, step_grads):
            p.grad = gp if gp is not None else torch.zeros_like(p)
        set_lr(opt, lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return aux_losses


def answer_loss(logits: torch.Tensor, text: TextBatch, n_img: int) -> torch.Tensor:
    """Mean cross-entropy over answer tokens. Position n_img+j-1 predicts text token j."""
    pred = logits[:, n_img - 1 : n_img - 1 + text.ids.shape[1]]
    targets = text.ids.masked_fill(~text.loss_mask, -100)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def concat_text(texts: list[TextBatch], pad_id: int) -> TextBatch:
    seqs, masks = [], []
    for t in texts:
        for i in range(t.ids.shape[0]):
            n = int(t.lens[i])
            seqs.append(t.ids[i, :n].numpy())
            masks.append(t.loss_mask[i, :n].numpy())
    return pad_text(seqs, masks, pad_id)


def first_answer_index(text: TextBatch) -> torch.Tensor:
    """(B,) index of each row's first answer token: the end of its first question."""
    return text.loss_mask.to(torch.int8).argmax(dim=1)


def server_train_step(
    model: ServerModel,
    opt: torch.optim.Optimizer,
    y_hats: list[torch.Tensor],
    texts: list[TextBatch],
    pad_id: int,
    lr: float,
    image_after_question: bool = False,
) -> tuple[float, list[torch.Tensor]]:
    """One server step on the concatenated micro-batches of all clients.

    Returns the loss and dL/dy_hat split back per client (the downlink gradients)."""
    y = torch.cat(y_hats).requires_grad_(True)
    text = concat_text(texts, pad_id)
    loss = answer_loss(model.logits(y, text.ids, first_answer_index(text) if image_after_question else None), text, y.shape[1])
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite server loss {float(loss)}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    set_lr(opt, lr)
    opt.step()
    return float(loss.detach()), list(y.grad.split([t.shape[0] for t in y_hats]))


@torch.no_grad()
def server_generate(
    model: ServerModel, y_hat: torch.Tensor, prompts: list, eos_id: int, pad_id: int, max_new: int,
    split: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy decoding of the answer after each prompt; stops at eos or ``max_new``.

    Right-padded buffer and no KV cache: answers are a few tokens, and causal
    attention makes the padding after each row's cursor irrelevant."""
    B, n_img = y_hat.shape[0], y_hat.shape[1]
    lens = torch.tensor([len(p) for p in prompts])
    buf = torch.full((B, int(lens.max()) + max_new), pad_id, dtype=torch.int64)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.as_tensor(p)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    rows = torch.arange(B)
    for _ in range(max_new):
        width = int(lens.max())
        logits = model.logits(y_hat, buf[:, :width], split)
        nxt = logits[rows, n_img + lens - 1].argmax(-1)
        for i in range(B):
            if not done[i]:
                if int(nxt[i]) == eos_id:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        buf[rows, lens] = torch.where(done, pad_id, nxt)
        lens = lens + 1
        if bool(done.all()):
            break
    return out


def exact_match(pred: list[list[int]], answers: list) -> list[bool]:
    return [list(p) == [int(a) for a in ans] for p, ans in zip(pred, answers)]
