"""The vision tower and the LLM: tiny ones built from config, or ``from_pretrained``.

The vision tower is a ``transformers`` ``SiglipVisionModel`` (``CLIPVisionModel`` is
accepted for pretrained towers) and the LLM an ``AutoModelForCausalLM``. ``tiny``
builds both from small configs with a seeded initialisation; anything else is a local
directory or hub id loaded with ``from_pretrained``, always in fp32 (the master weights;
``precision`` sets the compute dtype with autocast, :mod:`sim.model.device`), whatever
dtype the checkpoint was saved in. Also the widths and token counts
at the split point, and TinyLLaVA's connector.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import (
    AutoConfig, AutoModelForCausalLM, CLIPVisionModel, LlamaConfig, PreTrainedModel, SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.utils import logging as hf_logging

from sim.config import TINY, SplitConfig

# transformers draws a progress bar for every weight load and save; every simulated client
# loads a checkpoint, so the bars would bury the run's own log lines
hf_logging.disable_progress_bar()

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
    source = cfg.vision_tower_source
    if source == TINY:
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
    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type not in _VISION_CLASSES:
        raise ValueError(
            f"vision-tower {source!r} has model_type {model_type!r}; supported: {', '.join(sorted(_VISION_CLASSES))}"
        )
    tower = _VISION_CLASSES[model_type].from_pretrained(source, dtype=torch.float32)
    size = tower.config.image_size
    if size != cfg.image_size:
        raise ValueError(f"image-size is {cfg.image_size} but vision-tower {source!r} expects {size}")
    return tower


def build_llm(cfg: SplitConfig, vocab_size: int) -> PreTrainedModel:
    """A Llama-style causal LM: tiny from config, or ``from_pretrained``."""
    if cfg.llm_source == TINY:
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
    llm = AutoModelForCausalLM.from_pretrained(cfg.llm_source, dtype=torch.float32)
    if llm.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(
            f"llm {cfg.llm_source!r} has {llm.get_input_embeddings().num_embeddings} embeddings but the "
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
    if cfg.vision_tower_source == TINY:
        return cfg.num_image_tokens
    vc = AutoConfig.from_pretrained(cfg.vision_tower_source)
    vc = getattr(vc, "vision_config", vc)
    return (vc.image_size // vc.patch_size) ** 2


@functools.lru_cache(maxsize=8)
def llm_hidden_size(cfg: SplitConfig) -> int:
    """Feature width D at the split point (the LLM's hidden size)."""
    return cfg.hidden_size if cfg.llm_source == TINY else AutoConfig.from_pretrained(cfg.llm_source).hidden_size


def patch_tokens(tower: PreTrainedModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,N,Dv): the tower's last hidden state at every patch."""
    out = tower(pixel_values=pixels).last_hidden_state
    # CLIP prepends a CLS token; SigLIP has none, so every SigLIP token is a patch.
    return out[:, 1:] if isinstance(tower, CLIPVisionModel) else out


@functools.lru_cache(maxsize=8)
def vision_hidden_size(cfg: SplitConfig) -> int:
    if cfg.vision_tower_source == TINY:
        return cfg.hidden_size
    vc = AutoConfig.from_pretrained(cfg.vision_tower_source)
    return getattr(vc, "vision_config", vc).hidden_size


def stream_width(cfg: SplitConfig, stream: str) -> int:
    """Feature width of an uplink stream: the vision width at ``vit-ln1:k`` (image,
    residual), else the LLM's hidden size."""
    if stream in ("image", "residual") and cfg.split_block is not None:
        return vision_hidden_size(cfg)
    return llm_hidden_size(cfg)


def make_connector(vdim: int, llm_dim: int) -> nn.Sequential:
    """TinyLLaVA's connector: 2-layer MLP with GELU."""
    return nn.Sequential(nn.Linear(vdim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
