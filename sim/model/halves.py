"""The two halves of a TinyLLaVA-style model, split after the connector or inside the tower.

Quantized-TinyLLaVA's split (arXiv 2511.23402, Fig. 1; ``split-point=connector``)::

    client: pixels (B,3,H,W) -> vision tower -> (B,N,Dv) -> connector (2-layer MLP, GELU)
            -> (B,N,D) -> compressor client half --codes--> wire
    server: wire --> compressor server half -> (B,N,D) ++ text embeddings -> causal LM

AlignedVQ's split (LLaVA-AlignedVQ, arXiv 2411.05961; ``split-point=vit-ln1:k``,
:mod:`sim.model.vit_split`)::

    client: pixels -> embeddings, blocks < k, LN1 of block k -> h (B,N,Dv) -> codec --> wire
            [residual x (B,N,Dv) -> residual codec --> wire   (residual-mode=transmit)]
    server: wire --> codec server half (DLP out) -> rest of block k (x_hat = h_hat, or the
            decoded residual) -> blocks > k -> post-LN -> connector -> LLM [+ LoRA]

With ``text-mode=quantized`` the client also looks the text tokens up in a frozen copy
of the LLM's embedding table and sends them through a separate text codec. Each half
holds one codec half per active stream; they cross as :class:`~sim.compress.streams.Streams`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from sim.compress import ClientCodec, Codec, Encoded, ServerCodec
from sim.compress.streams import Streams
from sim.config import SplitConfig, active_streams
from sim.data.tokenizer import get_tokenizer

from .device import autocast, enable_checkpointing, full_precision, module_device
from .feature_noise import FeatureRelease, add_feature_noise
from .nopeek import nopeek_loss
from .pretrained import load_connector
from .towers import (
    build_llm, build_vision_tower, llm_hidden_size, make_connector, patch_tokens, stream_width, vision_hidden_size,
)
from .vit_split import VisionHead, VisionTail


@dataclass
class ClientBatch:
    """What the client encodes for one micro-batch: pixels and, with ``text-mode=quantized``,
    the token id sequences whose embeddings are quantised (all tokens in training, the
    prompts at evaluation)."""

    pixels: torch.Tensor  # (B,3,H,W)
    text: list[np.ndarray] | None = None
    release: FeatureRelease | None = None  # its tag and feature-noise-clip bound (sim/model/feature_noise.py)


class ClientModel(nn.Module):
    """Vision tower (whole, or up to LN1 of block k) [+ connector] + compressor client halves.

    Streams (:func:`sim.config.active_streams`): ``codec`` encodes the image features at
    the split point, ``residual_codec`` the residual stream at ``vit-ln1:k`` (transmit
    mode), ``text_codec`` the text-token embeddings looked up in ``text_embed``, a frozen
    copy of the LLM's input embedding table (``text-mode=quantized``).

    ``precision`` (``bf16``/``fp16``) runs the tower and the connector under autocast
    (:func:`sim.model.device.autocast`); the features leave them as fp32, so the codecs and
    the wire never see the low precision."""

    def __init__(
        self, tower: PreTrainedModel, llm_dim: int, codecs: Streams[ClientCodec], train_tower: bool,
        feature_noise: float = 0.0, noise_seed: int = 0, *, split_block: int | None = None,
        text_embed: nn.Embedding | None = None, precision: str = "fp32", nopeek_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.precision = precision
        self.feature_noise, self.noise_seed = feature_noise, noise_seed  # privacy defence, 0 = off
        self.nopeek_weight = nopeek_weight  # NoPeek's lambda (sim/model/nopeek.py), 0 = off
        self.split_block = split_block
        if split_block is None:
            vdim = tower.config.hidden_size
            self.tower = tower.requires_grad_(train_tower)
            self.connector = make_connector(vdim, llm_dim)
        else:
            self.tower = VisionHead(tower, split_block).requires_grad_(train_tower)
        self.codec, self.residual_codec, self.text_codec = codecs.image, codecs.residual, codecs.text
        self.text_embed = text_embed.requires_grad_(False) if text_embed is not None else None

    def codecs(self) -> Streams[ClientCodec]:
        """The codec client half of every active stream."""
        return Streams(self.codec, self.residual_codec, self.text_codec)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    def split_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,3,H,W) -> image features at the split point (B,N,D) and, at ``vit-ln1:k``, the
        residual stream (B,N,Dv) (None after the connector); fp32 whatever ``precision``."""
        with autocast(pixels.device, self.precision):
            if self.split_block is None:
                h, x = self.connector(patch_tokens(self.tower, pixels)), None
            else:
                x, h = self.tower(pixels)
        return h.float(), (x.float() if x is not None else None)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B,N,D): the image features at the split point, before compression."""
        return self.split_features(pixels)[0]

    def noisy(self, x: torch.Tensor, pixels: torch.Tensor, release: FeatureRelease | None = None) -> torch.Tensor:
        """The features as sent: with ``feature-noise``, seeded noise per image; with a ``release``
        clipping bound, clipped and fresh noise per release (sim/model/feature_noise.py)."""
        if self.feature_noise > 0 or (release is not None and release.clip > 0):
            return add_feature_noise(x, pixels, self.feature_noise, self.noise_seed, release)
        return x

    def text_tokens(self, seqs: list[np.ndarray]) -> torch.Tensor:
        """Token id sequences -> their embeddings, concatenated: (1, sum(len), D)."""
        if self.text_embed is None:
            raise RuntimeError("this client model has no text embedding table (text-mode=ids)")
        ids = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]))
        return self.text_embed(ids.to(self.text_embed.weight.device))[None]

    def stream_inputs(self, batch: ClientBatch) -> Streams[torch.Tensor]:
        """What each active stream's codec encodes for one micro-batch."""
        x, residual = self.split_features(batch.pixels)
        text = None
        if self.text_codec is not None:
            if batch.text is None:
                raise ValueError("text-mode=quantized needs the token ids of the micro-batch")
            text = self.text_tokens(batch.text)
        return Streams(self.noisy(x, batch.pixels, batch.release), residual if self.residual_codec is not None else None, text)

    def forward(self, pixels: torch.Tensor) -> Encoded:
        """The image stream only: (B,3,H,W) -> Encoded."""
        return self.codec(self.noisy(self.features(pixels), pixels))

    def encode(self, batch: ClientBatch) -> Streams[Encoded]:
        """Every active stream of one micro-batch; with ``nopeek-weight`` the image stream's
        aux loss also holds NoPeek's term (:meth:`with_nopeek`)."""
        codecs = self.codecs()
        inputs = self.stream_inputs(batch)
        encs = inputs.map(lambda s, x: codecs[s](x))
        return dataclasses.replace(encs, image=self.with_nopeek(encs.image, batch.pixels, inputs.image))

    def with_nopeek(self, enc: Encoded, pixels: torch.Tensor, y: torch.Tensor) -> Encoded:
        """``enc`` with ``lambda * dCor(pixels, y)`` added to its aux loss (NoPeek, arXiv
        2008.09161; sim/model/nopeek.py, docs/privacy.md), only while training with gradients
        on: the recompute before the optimiser step (sim/training/split_step.py) is where the
        term is minimised and where the reported aux loss comes from; the no-grad encode for
        the wire and evaluation leave ``enc`` as it is, so the bytes sent never depend on it.

        ``y`` is what the codec receives (after ``feature-noise``), not the decoded
        ``y_hat``: it is the cut-layer activation NoPeek decorrelates, the codes and ``y_hat``
        are computed from it, and its gradient does not pass a codec's straight-through or
        zero-gradient quantiser, so one ``lambda`` means the same for every codec and width."""
        if self.nopeek_weight <= 0 or not (self.training and torch.is_grad_enabled()):
            return enc
        return dataclasses.replace(enc, aux_loss=enc.aux_loss + nopeek_loss(pixels, y, self.nopeek_weight))

    @torch.no_grad()
    def init_codecs(self, batches: list[ClientBatch]) -> bool:
        """Data-dependent codec initialisation (k-means, EMA statistics) from ``batches``;
        returns whether any codec needed it."""
        todo = {k: c for k, c in self.codecs().items() if c.needs_init}
        if not todo:
            return False
        inputs = Streams.zip([self.stream_inputs(b) for b in batches])
        for k, codec in todo.items():
            xs = inputs[k]
            codec.init_from(torch.cat(xs) if k != "text" else torch.cat([x[0] for x in xs])[None])
        return True


class ServerModel(nn.Module):
    """Compressor server halves [+ rest of the vision tower + connector] + causal LM.

    ``precision`` (``bf16``/``fp16``) runs the vision tail, the connector and the LLM under
    autocast; the codec server halves decode and project in fp32."""

    def __init__(
        self, codecs: Streams[ServerCodec], llm: PreTrainedModel, *, tail: VisionTail | None = None,
        connector: nn.Module | None = None, precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.precision = precision
        self.codec = codecs.image
        self.llm = llm
        self.tail, self.connector = tail, connector
        self.residual_codec, self.text_codec = codecs.residual, codecs.text
        # what the finetune stage trains of the LLM (set_stage freezes it for align)
        self.llm_finetuned = [p for p in llm.parameters() if p.requires_grad]

    def codecs(self) -> Streams[ServerCodec]:
        """The codec server half of every active stream."""
        return Streams(self.codec, self.residual_codec, self.text_codec)

    def specs(self) -> Streams[Codec]:
        """The codec definitions (shared with the clients) of every active stream."""
        return self.codecs().map(lambda _, c: c.spec)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    def image_embeds(self, streams: Streams[torch.Tensor]) -> torch.Tensor:
        """Decoded image (and residual) streams -> (B,N,D) image tokens for the LLM."""
        dev = streams.image.device
        with full_precision(dev, self.precision):
            z = self.codec(streams.image)
            if self.tail is None:
                return z
            residual = self.residual_codec(streams.residual) if self.residual_codec is not None else z
        with autocast(dev, self.precision):
            return self.connector(self.tail(z, residual))

    def text_embeds(self, text_ids: torch.Tensor, lens: torch.Tensor | None = None, text_hat: torch.Tensor | None = None) -> torch.Tensor:
        """(B,T) ids -> (B,T,D) embeddings; with ``text_hat`` (1, sum(lens), D) the decoded
        quantised embeddings of the first ``lens[b]`` tokens of each row replace the lookup."""
        table = self.llm.get_input_embeddings()
        txt = table(text_ids)
        if text_hat is None:
            return txt
        if self.text_codec is None:
            raise RuntimeError("quantised text given but the server has no text codec")
        with full_precision(txt.device, self.precision):
            flat = self.text_codec(text_hat[0]).to(txt.dtype)
        valid = torch.arange(txt.shape[1], device=txt.device)[None] < lens.to(txt.device)[:, None]
        if int(valid.sum()) != flat.shape[0]:
            raise ValueError(f"{flat.shape[0]} quantised text tokens for {int(valid.sum())} positions")
        return txt.masked_scatter(valid[..., None], flat)

    def sequence_logits(self, img: torch.Tensor, txt: torch.Tensor, split: torch.Tensor | None = None) -> torch.Tensor:
        """(B,N,D) image tokens + (B,T,D) text embeddings -> (B,N+T,V) logits.

        The image tokens go after the first ``split[b]`` text tokens of row ``b`` (the
        first question), or first when ``split`` is None. Text token ``j >= split`` sits
        at position ``N + j`` either way, so answers are read out at the same positions."""
        with autocast(txt.device, self.precision):
            return sequence_logits(self.llm, img, txt, split)

    def logits(self, y_hat: torch.Tensor, text_ids: torch.Tensor, split: torch.Tensor | None = None) -> torch.Tensor:
        """(B,N,D) decoded image features + (B,T) ids -> (B,N+T,V) logits (image stream only)."""
        return self.sequence_logits(self.image_embeds(Streams(y_hat)), self.text_embeds(text_ids), split)


def sequence_logits(llm: nn.Module, img: torch.Tensor, txt: torch.Tensor, split: torch.Tensor | None = None) -> torch.Tensor:
    """The LLM's logits over image tokens placed among the text (:meth:`ServerModel.sequence_logits`)."""
    img = img.to(txt.dtype)
    if split is None:
        return llm(inputs_embeds=torch.cat([img, txt], dim=1)).logits
    B, T, D = txt.shape
    N = img.shape[1]
    split = split.to(txt.device)
    j = torch.arange(T, device=txt.device).expand(B, T)
    text_pos = torch.where(j < split[:, None], j, j + N)
    img_pos = split[:, None] + torch.arange(N, device=txt.device)
    seq = txt.new_zeros(B, N + T, D)
    seq = seq.scatter(1, text_pos[..., None].expand(B, T, D), txt)
    seq = seq.scatter(1, img_pos[..., None].expand(B, N, D), img)
    return llm(inputs_embeds=seq).logits


def _text_embedding_copy(cfg: SplitConfig, vocab_size: int) -> nn.Embedding:
    """The client's frozen copy of the LLM's input embedding table (built like the server's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        table = build_llm(cfg, vocab_size).get_input_embeddings().weight.detach().clone()
    return nn.Embedding.from_pretrained(table, freeze=True)


def _codec_halves(cfg: SplitConfig) -> Streams[tuple[ClientCodec, ServerCodec]]:
    """Both halves of every active stream's codec. Each side builds both, in stream order,
    so that the seeded initialisation of whatever it builds next is the same on both sides
    and in every run (the unused halves are dropped). Inserted into a pretrained model
    (``init=<dir>``), they start near the identity."""
    def halves(stream: str) -> tuple[ClientCodec, ServerCodec]:
        spec = cfg.codec(stream, stream_width(cfg, stream))
        client, server = spec.client(), spec.server()
        if cfg.init_dir is not None:
            client.start_near_identity()
            server.start_near_identity()
        return client, server

    return Streams.of({s: halves(s) for s in active_streams(cfg)})


def build_client_model(cfg: SplitConfig, vocab_size: int | None = None, device: torch.device | None = None) -> ClientModel:
    """The client half, initialised from ``cfg.seed`` (identical on every client), on the
    CPU, then moved to ``device`` (the same initial weights on every device)."""
    text_embed = None
    if cfg.text_mode == "quantized":
        text_embed = _text_embedding_copy(cfg, vocab_size if vocab_size is not None else len(get_tokenizer(cfg)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = build_vision_tower(cfg)
        if cfg.gradient_checkpointing:
            enable_checkpointing(tower)
        codecs = _codec_halves(cfg).map(lambda _, h: h[0])
        model = ClientModel(tower, llm_hidden_size(cfg), codecs, cfg.trains_vision_tower, cfg.feature_noise, cfg.seed,
                            split_block=cfg.split_block, text_embed=text_embed, precision=cfg.precision,
                            nopeek_weight=cfg.nopeek_weight)
    if cfg.init_dir is not None and cfg.split_block is None:
        load_connector(cfg.init_dir, model.connector)
    return model if device is None else model.to(device)


def apply_lora(llm: PreTrainedModel, rank: int, alpha: float) -> nn.Module:
    """LoRA adapters (``peft``) on every linear layer of the LLM but the output head; the
    base weights are frozen, so only the adapters train (LLaVA-AlignedVQ section 3.2.3).

    ``peft`` is imported here, not with the module: only a server half with LoRA needs it,
    and every deployment message's ClientApp process imports this module
    (docs/deployment.md, "Cost on loopback")."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules="all-linear")
    return get_peft_model(llm, config)


def build_server_model(cfg: SplitConfig, vocab_size: int, device: torch.device | None = None) -> ServerModel:
    """The server half, initialised from ``cfg.seed + 1`` (the vision tail at ``vit-ln1:k``
    from ``cfg.seed``, i.e. the same initial tower as the clients'), on the CPU, then moved
    to ``device``."""
    tail = None
    if cfg.split_block is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            tower = build_vision_tower(cfg)
            if cfg.gradient_checkpointing:
                enable_checkpointing(tower)
            tail = VisionTail(tower, cfg.split_block).requires_grad_(cfg.trains_vision_tower)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        llm = build_llm(cfg, vocab_size)
        if cfg.gradient_checkpointing:  # on the base model: peft's wrapper forwards to it
            enable_checkpointing(llm)
        codecs = _codec_halves(cfg).map(lambda _, h: h[1])
        connector = make_connector(vision_hidden_size(cfg), llm_hidden_size(cfg)) if tail is not None else None
        if cfg.llm_lora_rank > 0:  # last, so the adapters' random init leaves the rest as without LoRA
            llm = apply_lora(llm, cfg.llm_lora_rank, cfg.llm_lora_alpha)
        if cfg.text_mode == "quantized":  # the clients hold a frozen copy of this table
            llm.get_input_embeddings().weight.requires_grad_(False)
    if connector is not None and cfg.init_dir is not None:
        load_connector(cfg.init_dir, connector)
    model = ServerModel(codecs, llm, tail=tail, connector=connector, precision=cfg.precision)
    return model if device is None else model.to(device)


def set_stage(model: ServerModel, stage: str) -> None:
    """Freeze the LLM for TinyLLaVA's ``align`` stage; unfreeze what fine-tuning trains
    (``finetune``: every LLM weight that trains, or only the LoRA adapters). A frozen
    weight gets no gradient, so AdamW keeps no state for it."""
    if stage not in ("align", "finetune"):
        raise ValueError(f"unknown stage {stage!r}; valid: align, finetune")
    for p in model.llm_finetuned:
        p.requires_grad_(stage == "finetune")
