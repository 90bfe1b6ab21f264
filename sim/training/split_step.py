"""The split training step in plain PyTorch: what one micro-batch does on each side.

One micro-batch of split learning (SplitFed: all sampled clients' micro-batches are
concatenated into one server step)::

    client  encode(pixels)              -> Encoded y (B,N,D)      [uplink: codes]
    server  train_step([y_hat_i], text) -> loss, [dL/dy_hat_i]    [downlink: grads]
    client  apply_grads(pixels, grad)   -> recompute, backward, optimiser step

Each of ``y``/``y_hat``/``dL/dy_hat`` is a :class:`~sim.compress.streams.Streams` bundle:
one tensor per active uplink stream (``image``; plus ``residual`` at ``vit-ln1:k`` with
``residual-mode=transmit`` and ``text`` with ``text-mode=quantized``).

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

from sim.compress.streams import Streams
from sim.data.batches import TextBatch, pad_text
from sim.model import ClientBatch, ClientModel, ServerModel

from .schedule import clip_grads, set_lr

FP16_INIT_SCALE = 2.0**16  # the first loss scale tried under precision=fp16 (torch.amp.GradScaler's default)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def scaled_grads(output: torch.Tensor, inputs: list[torch.Tensor], fp16: bool) -> tuple[torch.Tensor | None, ...]:
    """``d output / d inputs`` (None for an input ``output`` does not use).

    With ``fp16`` (``precision=fp16``) the backward runs on ``S * output`` and the gradients
    are divided by ``S``, so that small gradients do not flush to zero in half precision
    (dynamic loss scaling, Micikevicius et al., "Mixed Precision Training", arXiv
    1710.03740). ``S`` starts at :data:`FP16_INIT_SCALE` and halves, on the same graph,
    until every gradient is finite; a power of two scales exactly. It is chosen per step,
    so no scaler state has to survive between messages (a client keeps none). Without
    ``fp16`` it is ``torch.autograd.grad`` itself."""
    if not fp16:
        return torch.autograd.grad(output, inputs, allow_unused=True)
    scale = FP16_INIT_SCALE
    while scale >= 1.0:
        grads = torch.autograd.grad(output * scale, inputs, allow_unused=True, retain_graph=True)
        if all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            return tuple(None if g is None else g / scale for g in grads)
        scale /= 2
    raise FloatingPointError("fp16 gradients are not finite even with a loss scale of 1")


def client_apply_grads(
    model: ClientModel,
    opt: torch.optim.Optimizer,
    batches: list[ClientBatch],
    grads: list[Streams[torch.Tensor]],
    lrs: list[float],
    grad_clip: float = 0.0,
) -> list[float]:
    """Recompute each micro-batch, backprop its received gradients (one per uplink stream)
    plus the client's own auxiliary losses, then apply the optimiser steps in order (step
    ``s`` at rate ``lrs[s]``). Returns the aux losses. ``grad_clip`` > 0 clips each step's
    gradient norm."""
    params = trainable(model)
    per_step: list[tuple[torch.Tensor, ...]] = []
    aux_losses = []
    for batch, g in zip(batches, grads):
        encs = model.encode(batch)
        if g.names() != encs.names():
            raise ValueError(f"gradients for streams {g.names()}, the model encodes {encs.names()}")
        surrogate, aux = 0, 0
        for s, enc in encs.items():
            if enc.y.shape != g[s].shape:
                raise ValueError(f"{s} gradient shape {tuple(g[s].shape)} does not match features {tuple(enc.y.shape)}")
            surrogate = surrogate + (enc.y * g[s].to(enc.y.device)).sum() + enc.aux_loss
            aux = aux + enc.aux_loss.detach()
        per_step.append(scaled_grads(surrogate, params, model.precision == "fp16"))
        aux_losses.append(float(aux))
    for step_grads, lr in zip(per_step, lrs, strict=True):
        for p, gp in zip(params, step_grads):
            p.grad = gp if gp is not None else torch.zeros_like(p)
        clip_grads(params, grad_clip)
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


def image_split(position: str, first_len: torch.Tensor) -> torch.Tensor | None:
    """Where each row's image tokens go (``image-position``), given the length of its
    first question: ``None`` (before all text) for ``first``, after the question for
    ``after-question``, and before the question's last token for ``before-last-token``,
    so that a text token, not an image patch, sits at the position that predicts the
    first answer token."""
    if position == "first":
        return None
    if position == "after-question":
        return first_len
    if position == "before-last-token":
        return (first_len - 1).clamp_min(0)
    raise ValueError(f"unknown image position {position!r}")


def first_answer_index(text: TextBatch) -> torch.Tensor:
    """(B,) index of each row's first answer token: the end of its first question."""
    return text.loss_mask.to(torch.int8).argmax(dim=1)


def server_train_step(
    model: ServerModel,
    opt: torch.optim.Optimizer,
    y_hats: list[Streams[torch.Tensor]],
    texts: list[TextBatch],
    pad_id: int,
    lr: float,
    image_position: str = "first",
    grad_clip: float = 0.0,
    feature_grads: bool = True,
) -> tuple[float, list[Streams[torch.Tensor]] | None]:
    """One server step on the concatenated micro-batches of all clients.

    ``y_hats[c]`` is client ``c``'s decoded streams (``image`` (B,N,D), ``residual``
    (B,N,Dv), ``text`` (1,L,D)), on the CPU as decoded. Returns the loss and the gradients
    dL/dy_hat split back per client (the downlink), on the CPU; with ``feature_grads``
    off (a frozen client half) the features get no gradient and None is returned."""
    cat_dim = {"text": 1}  # the text stream is one row of all the micro-batch's tokens
    dev = model.device
    joined = Streams.zip(y_hats).map(lambda k, parts: torch.cat(parts, dim=cat_dim.get(k, 0)).to(dev).requires_grad_(feature_grads))
    text = concat_text(texts, pad_id).to(dev)
    img = model.image_embeds(joined)
    txt = model.text_embeds(text.ids, text.lens, joined.text)
    split = image_split(image_position, first_answer_index(text))
    loss = answer_loss(model.sequence_logits(img, txt, split), text, img.shape[1])
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite server loss {float(loss)}")
    opt.zero_grad(set_to_none=True)
    if model.precision == "fp16":
        leaves = [*trainable(model), *(joined.values() if feature_grads else [])]
        for t, gt in zip(leaves, scaled_grads(loss, leaves, True)):
            t.grad = gt
    else:
        loss.backward()
    if grad_clip > 0:  # skip building the parameter list on the default (unclipped) path
        clip_grads(trainable(model), grad_clip)
    set_lr(opt, lr)
    opt.step()
    if not feature_grads:
        return float(loss.detach()), None
    parts = joined.map(lambda k, v: v.grad.cpu().split([y[k].shape[cat_dim.get(k, 0)] for y in y_hats], dim=cat_dim.get(k, 0)))
    return float(loss.detach()), [parts.map(lambda _, p: p[c]) for c in range(len(y_hats))]


@torch.no_grad()
def server_generate(
    model: ServerModel, img: torch.Tensor, prompts: list, eos_id: int, pad_id: int, max_new: int,
    split: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy decoding of the answer after each prompt; stops at eos or ``max_new``.

    ``img`` is the (B,N,D) image tokens (:meth:`ServerModel.image_embeds`); a prompt is
    token ids, or (len, D) decoded embeddings (``text-mode=quantized``). Generated tokens
    are embedded with the server's own table. Right-padded buffer and no KV cache:
    answers are a few tokens, and causal attention makes the padding after each row's
    cursor irrelevant."""
    B, n_img = img.shape[0], img.shape[1]
    table = model.llm.get_input_embeddings()
    dev = img.device
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    buf = table(torch.full((B, int(lens.max()) + max_new), pad_id, dtype=torch.int64, device=dev)).clone()
    for i, p in enumerate(prompts):
        emb = p if torch.is_tensor(p) and p.is_floating_point() else table(torch.as_tensor(p, dtype=torch.int64, device=dev))
        buf[i, : len(p)] = emb.to(buf.dtype)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    for _ in range(max_new):
        width = int(lens.max())
        logits = model.sequence_logits(img, buf[:, :width], split)
        nxt = logits[rows, n_img + lens - 1].argmax(-1)
        for i in range(B):
            if not done[i]:
                if int(nxt[i]) == eos_id:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        buf[rows, lens] = table(torch.where(done, pad_id, nxt))
        lens = lens + 1
        if bool(done.all()):
            break
    return out


def exact_match(pred: list[list[int]], answers: list) -> list[bool]:
    return [list(p) == [int(a) for a in ans] for p, ans in zip(pred, answers)]
