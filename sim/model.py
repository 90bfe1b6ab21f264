"""The two halves of a TinyLLaVA-style model, split after the connector.

Quantized-TinyLLaVA's split (paper 000, Fig. 1)::

    client: pixels (B,3,H,W) -> vision tower -> (B,N,Dv) -> connector (2-layer MLP, GELU)
            -> (B,N,D) -> compressor client half --codes--> wire
    server: wire --> compressor server half -> (B,N,D) ++ text embeddings -> causal LM

The vision tower is a ``transformers`` ``SiglipVisionModel`` (``CLIPVisionModel`` is
accepted for pretrained towers) and the LLM an ``AutoModelForCausalLM``. ``tiny``
builds both from small configs with a seeded initialisation; anything else is a
local directory or hub id loaded with ``from_pretrained``.
"""

from __future__ import annotations

import functools

import torch
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


class ClientModel(nn.Module):
    """Vision tower + connector + compressor client half."""

    def __init__(self, tower: PreTrainedModel, llm_dim: int, codec: ClientCodec, train_tower: bool) -> None:
        super().__init__()
        vdim = tower.config.hidden_size
        self.tower = tower.requires_grad_(train_tower)
        self.connector = nn.Sequential(nn.Linear(vdim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.codec = codec

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B,N,D): the features at the split point, before compression."""
        return self.connector(_patch_tokens(self.tower, pixels))

    def forward(self, pixels: torch.Tensor) -> Encoded:
        return self.codec(self.features(pixels))


class ServerModel(nn.Module):
    """Compressor server half + causal language model."""

    def __init__(self, codec: ServerCodec, llm: PreTrainedModel) -> None:
        super().__init__()
        self.codec = codec
        self.llm = llm

    def logits(self, y_hat: torch.Tensor, text_ids: torch.Tensor, split: torch.Tensor | None = None) -> torch.Tensor:
        """(B,N,D) reconstructed features + (B,T) ids -> (B,N+T,V) logits.

        The image tokens go after the first ``split[b]`` text tokens of row ``b`` (the
        first question), or first when ``split`` is None. Text token ``j >= split`` sits
        at position ``N + j`` either way, so answers are read out at the same positions."""
        img = self.codec(y_hat)
        txt = self.llm.get_input_embeddings()(text_ids)
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


def build_client_model(cfg: SplitConfig) -> ClientModel:
    """The client half, initialised from ``cfg.seed`` (identical on every client)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = build_vision_tower(cfg)
        llm_dim = llm_hidden_size(cfg)
        codec, _ = build_codecs(cfg, llm_dim)
        return ClientModel(tower, llm_dim, codec, cfg.train_vision_tower)


def build_server_model(cfg: SplitConfig, vocab_size: int) -> ServerModel:
    """The server half, initialised from ``cfg.seed + 1``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        llm = build_llm(cfg, vocab_size)
        _, codec = build_codecs(cfg, llm.config.hidden_size)
        return ServerModel(codec, llm)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (what FedAvg averages and the wire carries)."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
