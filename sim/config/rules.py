"""Rules that relate several config keys; each raises :class:`ConfigError` naming a key.

A single key's type and allowed values are part of its declaration (:mod:`sim.config.keys`,
the codecs' settings); :meth:`SplitConfig.__post_init__` checks those first, then these.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from sim.compress import get_codec
from sim.settings import ConfigError, check_range

from .keys import CASE_STUDIES, TINY

if TYPE_CHECKING:
    from .split_config import SplitConfig

INIT_PARTS = ("manifest.json", "vision_tower", "llm", "tokenizer", "connector.safetensors")  # sim.model.pretrained
CASE_STUDY_IMAGE_SIZES = (16, 384)  # the scikit-image case studies render tiles in this range
STREAM_KEYS = {"image": ("compressor", "bits"), "residual": ("residual-compressor", "residual-bits"),
               "text": ("text-compressor", "text-bits"), "gradient": ("grad-compressor", "grad-bits")}


def active_streams(c: SplitConfig) -> tuple[str, ...]:
    """The uplink streams of a run: ``image`` always; ``residual`` for ``vit-ln1:k`` with
    ``residual-mode=transmit``; ``text`` for ``text-mode=quantized``."""
    out = ["image"]
    if c.split_block is not None and c.residual_mode == "transmit":
        out.append("residual")
    if c.text_mode == "quantized":
        out.append("text")
    return tuple(out)


def _split_block_exists(c: SplitConfig) -> None:
    if c.split_block is not None and c.vision_tower_source == TINY and c.split_block >= c.vision_layers:
        raise ConfigError(f"Config key 'split-point' ({c.split_point}) names block {c.split_block} but the vision "
                          f"tower has {c.vision_layers} blocks (vision-layers).")


def _stream_codecs(c: SplitConfig) -> None:
    """Every stream's codec serves that stream, takes its bits and fits the feature width."""
    for stream in (*active_streams(c), "gradient"):
        name_key, bits_key = STREAM_KEYS[stream]
        name, bits = c.stream_codec(stream)
        codec = get_codec(name)
        if stream not in codec.streams:
            raise ConfigError(f"Config key '{name_key}' resolves to {name!r}, which cannot serve the {stream} stream; "
                              f"it serves {', '.join(sorted(codec.streams))}.")
        check_range(bits_key if stream != "text" or c.text_bits else "bits", bits, *codec.bit_range)
        if stream == "gradient":
            continue
        try:
            codec.check(c.codec_settings(name), bits, _tiny_width(c, stream))
        except ValueError as err:
            raise ConfigError(f"Config key '{name_key}' ({name}, the {stream} stream): {err}.") from None


def _tiny_width(c: SplitConfig, stream: str) -> int:
    """A stream's feature width when the config alone fixes it (tiny models), else 0: the
    vision width at ``vit-ln1:k`` (image, residual), the LLM's otherwise."""
    vision = stream == "residual" or (stream == "image" and c.split_block is not None)
    return c.hidden_size if (c.vision_tower_source if vision else c.llm_source) == TINY else 0


def _entropy_coding(c: SplitConfig) -> None:
    if c.entropy_coding != "none" and not get_codec(c.compressor).integer_codes:
        raise ConfigError(f"Config key 'entropy-coding' ({c.entropy_coding}) needs a compressor with integer codes; "
                          f"compressor is {c.compressor!r}.")


def _grad_entropy_coding(c: SplitConfig) -> None:
    if c.grad_entropy_coding != "none" and not get_codec(c.grad_compressor).gradient_integer_codes:
        raise ConfigError(f"Config key 'grad-entropy-coding' ({c.grad_entropy_coding}) needs a gradient codec with "
                          f"integer codes; grad-compressor is {c.grad_compressor!r}.")


def _dataset(c: SplitConfig) -> None:
    if c.dataset in CASE_STUDIES:
        check_range("image-size", c.image_size, *CASE_STUDY_IMAGE_SIZES)
    if c.dataset == "llava-json":
        if not c.data_path and c.tokenizer_source == "auto":
            raise ConfigError(
                "Config key 'data-path' is required when dataset='llava-json' (or leave it empty, give every "
                "SuperNode its own with --node-config data-path=..., and set 'tokenizer' to a shared directory)."
            )
        if c.data_path and not Path(c.data_path).expanduser().is_file():
            raise ConfigError(f"Config key 'data-path': file {c.data_path!r} does not exist.")


def _model_ref(key: str, value: str, tiny_ok: bool) -> None:
    if tiny_ok and value == TINY:
        return
    if not value:
        raise ConfigError(f"Config key '{key}' is empty; give '{TINY}', a local directory or a hub id.")
    looks_local = value.startswith((".", "/", "~")) or Path(value).expanduser().exists()
    if looks_local and not Path(value).expanduser().is_dir():
        raise ConfigError(f"Config key '{key}': directory {value!r} does not exist.")
    if not looks_local and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value):
        raise ConfigError(f"Config key '{key}': {value!r} is neither a directory nor a hub id.")


def _init(c: SplitConfig) -> None:
    """``init`` names a checkpoint directory with the layout of :mod:`sim.model.pretrained`."""
    root = c.init_dir
    if root is None:
        return
    if not root.is_dir():
        raise ConfigError(f"Config key 'init': checkpoint directory {c.init!r} does not exist (make one with "
                          f"`python -m sim pretrain --out DIR`, or use init=scratch).")
    missing = [p for p in INIT_PARTS if not (root / p).exists()]
    if missing:
        raise ConfigError(f"Config key 'init': {c.init!r} is not a checkpoint made by `python -m sim pretrain`; "
                          f"it lacks {', '.join(missing)}.")


def _stages(c: SplitConfig) -> None:
    if c.stage == "both" and c.align_rounds >= c.num_server_rounds:
        raise ConfigError(f"Config key 'align-rounds' ({c.align_rounds}) must be below 'num-server-rounds' "
                          f"({c.num_server_rounds}) with stage=both, so that fine-tuning gets rounds.")


def _models(c: SplitConfig) -> None:
    _model_ref("vision-tower", c.vision_tower_source, tiny_ok=True)
    _model_ref("llm", c.llm_source, tiny_ok=True)
    if c.tokenizer_source != "auto":
        _model_ref("tokenizer", c.tokenizer_source, tiny_ok=False)
    if c.vision_tower_source == TINY and c.hidden_size % 4:
        raise ConfigError(f"Config key 'hidden-size' ({c.hidden_size}) must be divisible by 4 for the tiny vision tower.")
    check_range("patch-size", c.patch_size, 1, c.image_size)
    if c.vision_tower_source == TINY and c.image_size % c.patch_size:
        raise ConfigError(f"Config key 'patch-size' ({c.patch_size}) must divide 'image-size' ({c.image_size}).")


def _resume(c: SplitConfig) -> None:
    if c.resume and not c.run_name:
        raise ConfigError("Config key 'resume' continues the run in out-dir/run-name; set 'run-name' to that run's "
                          "directory name (an empty one names a new directory).")


def _precision(c: SplitConfig) -> None:
    """fp16 autocast needs an accelerator (``auto`` is resolved, and checked, where the models are built)."""
    if c.precision != "fp16":
        return
    for key, value in (("device", c.device), ("server-device", c.server_device)):
        if value == "cpu":
            raise ConfigError(f"Config key 'precision' is fp16 but '{key}' is cpu; use bf16 (CPU autocast) or fp32 "
                              "there, or a CUDA device.")


RULES = (_init, _stages, _split_block_exists, _stream_codecs, _entropy_coding, _grad_entropy_coding, _dataset, _models,
         _precision, _resume)
