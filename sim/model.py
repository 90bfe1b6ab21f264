"""The two halves of a TinyLLaVA-style model, split after the connector or inside the tower.

Quantized-TinyLLaVA's split (paper 000, Fig. 1; ``split-point=connector``)::

    client: pixels (B,3,H,W) -> vision tower -> (B,N,Dv) -> connector (2-layer MLP, GELU)
            -> (B,N,D) -> compressor client half --codes--> wire
    server: wire --> compressor server half -> (B,N,D) ++ text embeddings -> causal LM

AlignedVQ's split (paper 003; ``split-point=vit-ln1:k``, :mod:`sim.vit_split`)::

    client: pixels -> embeddings, blocks < k, LN1 of block k -> h (B,N,Dv) -> codec --> wire
            [residual x (B,N,Dv) -> residual codec --> wire   (residual-mode=transmit)]
    server: wire --> codec server half (DLP out) -> rest of block k (x_hat = h_hat, or the
            decoded residual) -> blocks > k -> post-LN -> connector -> LLM [+ LoRA]

With ``text-mode=quantized`` the client also looks the text tokens up in a frozen copy
of the LLM's embedding table and sends them through a separate text codec.

The vision tower is a ``transformers`` ``SiglipVisionModel`` (``CLIPVisionModel`` is
accepted for pretrained towers) and the LLM an ``AutoModelForCausalLM``. ``tiny``
builds both from small configs with a seeded initialisation; anything else is a
local directory or hub id loaded with ``from_pretrained``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionModel,
    LlamaConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from .compress import ClientCodec, Encoded, ServerCodec, build_codecs
from .config import TINY, SplitConfig
from .feature_noise import add_feature_noise
from .tokenizer import get_tokenizer
from .vit_split import VisionHead, VisionTail

# Initialisation of the tiny models (pretrained models keep their own weights). Measured on
# the synthetic benchmark (docs/results-spine.md): Llama's default std 0.02 is tuned for
# widths near 1000; at width 128 a std of 0.06 leaves the attention less uniform at init
# and learns the question-to-object binding faster. SigLIP's learned position
# embeddings start as 2-D sin-cos tables (MAE, He et al. 2022), scaled by 3 so they are
# not drowned by the patch content (std ~1), so that row and column are readable from
# the first step instead of being discovered from random vectors.
TINY_LLM_INIT_STD = 0.06
TINY_LLM_HEAD_DIM = 16  # 8 heads at width 128: more heads bind question words to objects faster
TINY_POS_EMB_SCALE = 3.0

_VISION_CLASSES = {
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
}


def build_vision_tower(cfg: SplitConfig) -> PreTrainedModel:
    """A SigLIP vision tower: tiny from config, or ``from_pretrained``."""
    if cfg.vision_tower == TINY:
        vc = SiglipVisionConfig(
            hidden_size=cfg.hidden_size,
            intermediate_size=2 * cfg.hidden_size,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=max(1, cfg.hidden_size // 32),
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            vision_use_head=False,
        )
        tower = SiglipVisionModel(vc)
        grid = cfg.image_size // cfg.patch_size
        with torch.no_grad():
            _embeddings(tower).position_embedding.weight.copy_(TINY_POS_EMB_SCALE * sincos_2d(grid, cfg.hidden_size))
        return tower
    model_type = AutoConfig.from_pretrained(cfg.vision_tower).model_type
    if model_type not in _VISION_CLASSES:
        raise ValueError(
            f"vision-tower {cfg.vision_tower!r} has model_type {model_type!r}; "
            f"supported: {', '.join(sorted(_VISION_CLASSES))}"
        )
    tower = _VISION_CLASSES[model_type].from_pretrained(cfg.vision_tower)
    size = tower.config.image_size
    if size != cfg.image_size:
        raise ValueError(f"image-size is {cfg.image_size} but vision-tower {cfg.vision_tower!r} expects {size}")
    return tower


def build_llm(cfg: SplitConfig, vocab_size: int) -> PreTrainedModel:
    """A Llama-style causal LM: tiny from config, or ``from_pretrained``."""
    if cfg.llm == TINY:
        lc = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=2 * cfg.hidden_size,
            num_hidden_layers=cfg.llm_layers,
            num_attention_heads=max(1, cfg.hidden_size // TINY_LLM_HEAD_DIM),
            num_key_value_heads=max(1, cfg.hidden_size // TINY_LLM_HEAD_DIM),
            max_position_embeddings=max(512, 4 * cfg.num_image_tokens),
            tie_word_embeddings=True,
            initializer_range=TINY_LLM_INIT_STD,
        )
        return AutoModelForCausalLM.from_config(lc)
    llm = AutoModelForCausalLM.from_pretrained(cfg.llm)
    if llm.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(
            f"llm {cfg.llm!r} has {llm.get_input_embeddings().num_embeddings} embeddings but the "
            f"tokenizer has {vocab_size} tokens; set tokenizer= to the LLM's own tokenizer"
        )
    return llm


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2-D sin-cos position table, row-major; column in the first half."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    row, col = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    oc, orow = col.reshape(-1, 1) * omega, row.reshape(-1, 1) * omega
    return torch.cat([oc.sin(), oc.cos(), orow.sin(), orow.cos()], dim=1).float()


def _embeddings(tower: PreTrainedModel) -> nn.Module:
    """The patch/position embedding module of a SigLIP or CLIP vision tower."""
    return getattr(tower, "vision_model", tower).embeddings


@functools.lru_cache(maxsize=8)
def image_token_count(cfg: SplitConfig) -> int:
    """Image tokens N per sample at the split point (every patch; no CLS)."""
    if cfg.vision_tower == TINY:
        return cfg.num_image_tokens
    vc = AutoConfig.from_pretrained(cfg.vision_tower)
    vc = getattr(vc, "vision_config", vc)
    return (vc.image_size // vc.patch_size) ** 2


@functools.lru_cache(maxsize=8)
def llm_hidden_size(cfg: SplitConfig) -> int:
    """Feature width D at the split point (the LLM's hidden size)."""
    return cfg.hidden_size if cfg.llm == TINY else AutoConfig.from_pretrained(cfg.llm).hidden_size


def _patch_tokens(tower: PreTrainedModel, pixels: torch.Tensor) -> torch.Tensor:
    out = tower(pixel_values=pixels).last_hidden_state
    # CLIP prepends a CLS token; SigLIP has none, so every SigLIP token is a patch.
    return out[:, 1:] if isinstance(tower, CLIPVisionModel) else out


# ----------------------------------------------------------------------------- streams
STREAM_PREFIX = {"image": "codec.", "residual": "residual_codec.", "text": "text_codec."}


def active_streams(cfg: SplitConfig) -> tuple[str, ...]:
    """The uplink streams of a run: ``image`` always; ``residual`` for ``vit-ln1:k`` with
    ``residual-mode=transmit``; ``text`` for ``text-mode=quantized``."""
    out = ["image"]
    if cfg.split_block is not None and cfg.residual_mode == "transmit":
        out.append("residual")
    if cfg.text_mode == "quantized":
        out.append("text")
    return tuple(out)


@functools.lru_cache(maxsize=8)
def vision_hidden_size(cfg: SplitConfig) -> int:
    if cfg.vision_tower == TINY:
        return cfg.hidden_size
    vc = AutoConfig.from_pretrained(cfg.vision_tower)
    return getattr(vc, "vision_config", vc).hidden_size


def stream_width(cfg: SplitConfig, stream: str) -> int:
    """Feature width of a stream: the vision width at ``vit-ln1:k`` (image, residual), else
    the LLM's hidden size."""
    if stream in ("image", "residual") and cfg.split_block is not None:
        return vision_hidden_size(cfg)
    return llm_hidden_size(cfg)


def make_connector(vdim: int, llm_dim: int) -> nn.Sequential:
    """TinyLLaVA's connector: 2-layer MLP with GELU."""
    return nn.Sequential(nn.Linear(vdim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


@dataclass
class ClientBatch:
    """What the client encodes for one micro-batch: pixels and, with ``text-mode=quantized``,
    the token id sequences whose embeddings are quantised (all tokens in training, the
    prompts at evaluation)."""

    pixels: torch.Tensor  # (B,3,H,W)
    text: list[np.ndarray] | None = None


class ClientModel(nn.Module):
    """Vision tower (whole, or up to LN1 of block k) [+ connector] + compressor client halves.

    Streams (see :func:`active_streams`): ``codec`` encodes the image features at the
    split point, ``residual_codec`` the residual stream at ``vit-ln1:k`` (transmit mode),
    ``text_codec`` the text-token embeddings looked up in ``text_embed``, a frozen copy
    of the LLM's input embedding table (``text-mode=quantized``)."""

    def __init__(
        self, tower: PreTrainedModel, llm_dim: int, codec: ClientCodec, train_tower: bool,
        feature_noise: float = 0.0, noise_seed: int = 0, *, split_block: int | None = None,
        residual_codec: ClientCodec | None = None, text_codec: ClientCodec | None = None,
        text_embed: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        self.feature_noise, self.noise_seed = feature_noise, noise_seed  # privacy defence, 0 = off
        self.split_block = split_block
        if split_block is None:
            vdim = tower.config.hidden_size
            self.tower = tower.requires_grad_(train_tower)
            self.connector = make_connector(vdim, llm_dim)
        else:
            self.tower = VisionHead(tower, split_block).requires_grad_(train_tower)
        self.codec = codec
        self.residual_codec = residual_codec
        self.text_codec = text_codec
        self.text_embed = text_embed.requires_grad_(False) if text_embed is not None else None

    def codecs(self) -> dict[str, ClientCodec]:
        """The stream codecs of this model, by stream name."""
        out = {"image": self.codec, "residual": self.residual_codec, "text": self.text_codec}
        return {k: v for k, v in out.items() if v is not None}

    def split_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,3,H,W) -> image features at the split point (B,N,D) and, at ``vit-ln1:k``, the
        residual stream (B,N,Dv) (None after the connector)."""
        if self.split_block is None:
            return self.connector(_patch_tokens(self.tower, pixels)), None
        x, h = self.tower(pixels)
        return h, x

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B,N,D): the image features at the split point, before compression."""
        return self.split_features(pixels)[0]

    def _noisy(self, x: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        if self.feature_noise > 0:  # feature-noise: seeded per image, before the compressor (sim/feature_noise.py)
            return add_feature_noise(x, pixels, self.feature_noise, self.noise_seed)
        return x

    def text_tokens(self, seqs: list[np.ndarray]) -> torch.Tensor:
        """Token id sequences -> their embeddings, concatenated: (1, sum(len), D)."""
        if self.text_embed is None:
            raise RuntimeError("this client model has no text embedding table (text-mode=ids)")
        ids = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]))
        return self.text_embed(ids)[None]

    def forward(self, pixels: torch.Tensor) -> Encoded:
        """The image stream only: (B,3,H,W) -> Encoded."""
        return self.codec(self._noisy(self.features(pixels), pixels))

    def encode(self, batch: ClientBatch) -> dict[str, Encoded]:
        """Every active stream of one micro-batch: ``{stream: Encoded}``."""
        x, residual = self.split_features(batch.pixels)
        out = {"image": self.codec(self._noisy(x, batch.pixels))}
        if self.residual_codec is not None:
            out["residual"] = self.residual_codec(residual)
        if self.text_codec is not None:
            if batch.text is None:
                raise ValueError("text-mode=quantized needs the token ids of the micro-batch")
            out["text"] = self.text_codec(self.text_tokens(batch.text))
        return out

    @torch.no_grad()
    def init_codecs(self, batches: list[ClientBatch]) -> bool:
        """Data-dependent codec initialisation (k-means, EMA statistics) from ``batches``;
        returns whether any codec needed it."""
        todo = {k: c for k, c in self.codecs().items() if c.needs_init}
        if not todo:
            return False
        inputs: dict[str, list[torch.Tensor]] = {k: [] for k in todo}
        for b in batches:
            x, residual = self.split_features(b.pixels)
            if "image" in todo:
                inputs["image"].append(self._noisy(x, b.pixels))
            if "residual" in todo:
                inputs["residual"].append(residual)
            if "text" in todo:
                inputs["text"].append(self.text_tokens(b.text)[0])
        for k, codec in todo.items():
            xs = inputs[k]
            codec.init_from(torch.cat(xs) if k != "text" else torch.cat(xs)[None])
        return True


class ServerModel(nn.Module):
    """Compressor server halves [+ rest of the vision tower + connector] + causal LM."""

    def __init__(
        self, codec: ServerCodec, llm: PreTrainedModel, *, tail: VisionTail | None = None,
        connector: nn.Module | None = None, residual_codec: ServerCodec | None = None,
        text_codec: ServerCodec | None = None,
    ) -> None:
        super().__init__()
        self.codec = codec
        self.llm = llm
        self.tail, self.connector = tail, connector
        self.residual_codec, self.text_codec = residual_codec, text_codec

    def codecs(self) -> dict[str, ServerCodec]:
        out = {"image": self.codec, "residual": self.residual_codec, "text": self.text_codec}
        return {k: v for k, v in out.items() if v is not None}

    def image_embeds(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoded image (and residual) streams -> (B,N,D) image tokens for the LLM."""
        z = self.codec(streams["image"])
        if self.tail is None:
            return z
        residual = self.residual_codec(streams["residual"]) if self.residual_codec is not None else z
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
        flat = self.text_codec(text_hat[0]).to(txt.dtype)
        valid = torch.arange(txt.shape[1])[None] < lens[:, None]
        if int(valid.sum()) != flat.shape[0]:
            raise ValueError(f"{flat.shape[0]} quantised text tokens for {int(valid.sum())} positions")
        return txt.masked_scatter(valid[..., None], flat)

    def sequence_logits(self, img: torch.Tensor, txt: torch.Tensor, split: torch.Tensor | None = None) -> torch.Tensor:
        """(B,N,D) image tokens + (B,T,D) text embeddings -> (B,N+T,V) logits.

        The image tokens go after the first ``split[b]`` text tokens of row ``b`` (the
        first question), or first when ``split`` is None. Text token ``j >= split`` sits
        at position ``N + j`` either way, so answers are read out at the same positions."""
        img = img.to(txt.dtype)
        if split is None:
            return self.llm(inputs_embeds=torch.cat([img, txt], dim=1)).logits
        B, T, D = txt.shape
        N = img.shape[1]
        j = torch.arange(T).expand(B, T)
        text_pos = torch.where(j < split[:, None], j, j + N)
        img_pos = split[:, None] + torch.arange(N)
        seq = txt.new_zeros(B, N + T, D)
        seq = seq.scatter(1, text_pos[..., None].expand(B, T, D), txt)
        seq = seq.scatter(1, img_pos[..., None].expand(B, N, D), img)
        return self.llm(inputs_embeds=seq).logits

    def logits(self, y_hat: torch.Tensor, text_ids: torch.Tensor, split: torch.Tensor | None = None) -> torch.Tensor:
        """(B,N,D) decoded image features + (B,T) ids -> (B,N+T,V) logits (image stream only)."""
        return self.sequence_logits(self.image_embeds({"image": y_hat}), self.text_embeds(text_ids), split)


def _text_embedding_copy(cfg: SplitConfig, vocab_size: int) -> nn.Embedding:
    """The client's frozen copy of the LLM's input embedding table (built like the server's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        table = build_llm(cfg, vocab_size).get_input_embeddings().weight.detach().clone()
    return nn.Embedding.from_pretrained(table, freeze=True)


def build_client_model(cfg: SplitConfig, vocab_size: int | None = None) -> ClientModel:
    """The client half, initialised from ``cfg.seed`` (identical on every client)."""
    text_embed = None
    if cfg.text_mode == "quantized":
        text_embed = _text_embedding_copy(cfg, vocab_size if vocab_size is not None else len(get_tokenizer(cfg)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = build_vision_tower(cfg)
        llm_dim = llm_hidden_size(cfg)
        codec, _ = build_codecs(cfg, stream_width(cfg, "image"))
        streams = active_streams(cfg)
        extra = {
            f"{s}_codec": build_codecs(cfg.stream_config(s), stream_width(cfg, s))[0] for s in ("residual", "text") if s in streams
        }
        return ClientModel(
            tower, llm_dim, codec, cfg.train_vision_tower, cfg.feature_noise, cfg.seed,
            split_block=cfg.split_block, text_embed=text_embed, **extra,
        )


def apply_lora(llm: PreTrainedModel, rank: int, alpha: float) -> nn.Module:
    """LoRA adapters (``peft``) on every linear layer of the LLM but the output head; the
    base weights are frozen, so only the adapters train (AlignedVQ section 3.2.3)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules="all-linear")
    return get_peft_model(llm, config)


def build_server_model(cfg: SplitConfig, vocab_size: int) -> ServerModel:
    """The server half, initialised from ``cfg.seed + 1`` (the vision tail at ``vit-ln1:k``
    from ``cfg.seed``, i.e. the same initial tower as the clients')."""
    tail = None
    if cfg.split_block is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            tail = VisionTail(build_vision_tower(cfg), cfg.split_block)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        llm = build_llm(cfg, vocab_size)
        _, codec = build_codecs(cfg, stream_width(cfg, "image"))
        streams = active_streams(cfg)
        extra = {
            f"{s}_codec": build_codecs(cfg.stream_config(s), stream_width(cfg, s))[1] for s in ("residual", "text") if s in streams
        }
        connector = make_connector(vision_hidden_size(cfg), llm_hidden_size(cfg)) if tail is not None else None
        if cfg.llm_lora_rank > 0:  # last, so the adapters' random init leaves the rest as without LoRA
            llm = apply_lora(llm, cfg.llm_lora_rank, cfg.llm_lora_alpha)
        if cfg.text_mode == "quantized":  # the clients hold a frozen copy of this table
            llm.get_input_embeddings().weight.requires_grad_(False)
        return ServerModel(codec, llm, tail=tail, connector=connector, **extra)


# ----------------------------------------------------------------------------- client state
def client_state_names(model: ClientModel) -> list[str]:
    """What FedAvg averages and the wire carries: the trainable parameters plus the
    codecs' round-synchronised buffers (AlignedVQ codebook, RD-FSQ EMA statistics)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for stream, codec in model.codecs().items():
        names += [STREAM_PREFIX[stream] + b for b in codec.synced_buffers]
    return names


def client_state(model: ClientModel) -> dict[str, torch.Tensor]:
    """The client state by name (detached copies), see :func:`client_state_names`."""
    full = dict(model.named_parameters())
    full.update(dict(model.named_buffers()))
    return {n: full[n].detach().clone() for n in client_state_names(model)}


def load_client_state(model: ClientModel, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the client state (strict: every name of :func:`client_state_names`, nothing else)."""
    names = set(client_state_names(model))
    if set(state) != names:
        missing, extra = sorted(names - set(state)), sorted(set(state) - names)
        raise ValueError(f"client weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    full = dict(model.named_parameters())
    full.update(dict(model.named_buffers()))
    with torch.no_grad():
        for n, t in state.items():
            if full[n].shape != t.shape:
                raise ValueError(f"weight {n!r} has shape {tuple(t.shape)}, expected {tuple(full[n].shape)}")
            full[n].copy_(t)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


@functools.lru_cache(maxsize=8)
def _synced_codec_types(cfg: SplitConfig) -> dict[str, ClientCodec]:
    """Fresh client codecs of the streams with synced state (read-only templates)."""
    out = {}
    for s in active_streams(cfg):
        codec = build_codecs(cfg.stream_config(s), stream_width(cfg, s))[0]
        if codec.synced_buffers:
            out[s] = codec
    return out


def fold_client_state(cfg: SplitConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Next round's client state from the FedAvg'd one: each codec folds its synced buffers."""
    for s, codec in _synced_codec_types(cfg).items():
        state = codec.fold_synced(state, STREAM_PREFIX[s])
    return state


def state_needs_init(cfg: SplitConfig, state: dict[str, torch.Tensor]) -> bool:
    """Whether a client state still lacks its data-dependent codec initialisation."""
    for s, template in _synced_codec_types(cfg).items():
        codec = copy.deepcopy(template)
        prefix = STREAM_PREFIX[s]
        codec.load_state_dict({b: state[prefix + b] for b in codec.synced_buffers}, strict=False)
        if codec.needs_init:
            return True
    return False


def load_server_synced(model: ServerModel, cfg: SplitConfig, state: dict[str, torch.Tensor]) -> None:
    """Install the round-synchronised client state the server halves decode with."""
    codecs = model.codecs()
    for s in _synced_codec_types(cfg):
        codecs[s].load_synced(state, STREAM_PREFIX[s])
