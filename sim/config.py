"""Typed, validated run configuration.

Flower hands the app a flat ``run_config`` mapping with kebab-case keys
(``[tool.flwr.app.config]`` in ``pyproject.toml`` plus ``--run-config`` overrides).
:meth:`SplitConfig.from_run_config` is the one place that mapping is parsed: it
rejects unknown keys (typos), coerces strings from the command line, and checks
every value, raising :class:`ConfigError` that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .faults import parse_faults


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


COMPRESSORS = ("identity", "rdfsq", "fsq", "nf", "topk", "vq")
INDEX_COMPRESSORS = ("rdfsq", "fsq", "nf", "vq")  # payloads with integer codes (entropy-codable)
STREAM_COMPRESSORS = ("identity", "rdfsq", "fsq", "nf", "topk")  # usable for the residual and text streams
GRAD_COMPRESSORS = ("none", "fp16", "topk", "nf")
NF_CODEBOOKS = ("seed", "qlora")
RDFSQ_STATS = ("global", "per-dim", "ema")
IDENTITY_DTYPES = ("fp16", "bf16", "fp32")
LR_SCHEDULES = ("cosine", "constant")
SPLIT_POINTS = ("connector", "vit-ln1:<k>")  # vit-ln1:k = after LayerNorm 1 of vision block k
TEXT_MODES = ("ids", "quantized")
RESIDUAL_MODES = ("rebuild", "transmit")
ENTROPY_CODINGS = ("none", "ans", "zstd")
IMAGE_POSITIONS = ("first", "after-question", "before-last-token")
DATASETS = ("synthetic", "llava-json", "pathology", "retina", "faces")
CASE_STUDY_IMAGE_SIZES = (16, 384)  # the scikit-image case studies render tiles in this range
PARTITIONERS = ("iid", "dirichlet")
BAD_RECORD_POLICIES = ("error", "skip")
TINY = "tiny"


@dataclass(frozen=True)
class SplitConfig:
    """All settings of one run. Field ``foo_bar`` is run-config key ``foo-bar``."""

    # --- federation and optimisation -------------------------------------------------
    num_server_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 1
    local_steps: int = 200
    steps_per_exchange: int = 20
    batch_size: int = 8
    lr: float = 5e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    grad_clip: float = 0.0
    seed: int = 0
    exchange_timeout_s: float = 600.0
    expected_clients: int = 0
    fault_inject: str = ""
    checkpoint: bool = True
    # --- compression -----------------------------------------------------------------
    compressor: str = "rdfsq"
    bits: int = 2
    split_point: str = "connector"
    rdfsq_stats: str = "per-dim"
    rdfsq_alpha: float = 0.0
    rdfsq_send_range: bool = False
    ema_decay: float = 0.99
    identity_dtype: str = "fp16"
    nf_block: int = 64
    nf_codebook: str = "seed"
    nf_double_quant: bool = False
    topk_random: float = 0.1
    vq_beta: float = 0.25
    vq_kmeans_iters: int = 10
    residual_mode: str = "rebuild"
    residual_compressor: str = "nf"
    residual_bits: int = 4
    entropy_coding: str = "none"
    grad_compressor: str = "none"
    grad_bits: int = 4
    text_mode: str = "ids"
    text_compressor: str = "same"
    text_bits: int = 0
    feature_noise: float = 0.0
    image_position: str = "after-question"
    # --- data ------------------------------------------------------------------------
    dataset: str = "synthetic"
    data_path: str = ""
    num_samples: int = 6000
    test_fraction: float = 0.1
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    image_size: int = 32
    on_bad_record: str = "error"
    # --- model -----------------------------------------------------------------------
    vision_tower: str = TINY
    llm: str = TINY
    tokenizer: str = "auto"
    hidden_size: int = 128
    vision_layers: int = 2
    llm_layers: int = 2
    patch_size: int = 4
    train_vision_tower: bool = True
    llm_lora_rank: int = 0
    llm_lora_alpha: float = 16.0
    max_answer_tokens: int = 4
    # --- network model and output ----------------------------------------------------
    bandwidth_mbps: float = 10.0
    rtt_ms: float = 20.0
    out_dir: str = "runs"
    run_name: str = ""
    # --- simulation resources --------------------------------------------------------
    client_cpus: float = 1.0
    eval_batch_size: int = 64

    # ------------------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | None = None) -> SplitConfig:
        """Build and validate a config from a kebab-case mapping (unknown keys fail)."""
        kwargs: dict[str, Any] = {}
        known = {f.name: f for f in fields(cls)}
        for key, raw in (run_config or {}).items():
            name = key.replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(key, [k.replace("_", "-") for k in known], 3)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise ConfigError(f"Unknown config key '{key}'.{hint}")
            kwargs[name] = _coerce(key, raw, known[name].type)
        return cls(**kwargs)

    def __post_init__(self) -> None:
        _validate(self)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping Flower uses (inverse of :meth:`from_run_config`)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> SplitConfig:
        """A validated copy with some fields changed (snake_case names)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_run_config(), indent=2, sort_keys=True)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per sample for the tiny vision tower (``(image/patch)^2``)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def split_block(self) -> int | None:
        """``k`` of ``split-point=vit-ln1:k`` (None for the connector split)."""
        m = _VIT_LN1.fullmatch(self.split_point)
        return int(m.group(1)) if m else None

    def stream_config(self, stream: str) -> SplitConfig:
        """The config whose ``compressor``/``bits`` build the codec of an uplink stream:
        ``image`` (this config), ``residual`` (``residual-compressor`` at ``residual-bits``)
        or ``text`` (``text-compressor`` at ``text-bits``; ``same``/0 reuse the image ones)."""
        if stream == "image":
            return self
        if stream == "residual":
            name, bits = self.residual_compressor, self.residual_bits
        elif stream == "text":
            name = self.compressor if self.text_compressor == "same" else self.text_compressor
            bits = self.text_bits or self.bits
        else:
            raise ValueError(f"unknown uplink stream {stream!r}; valid: image, residual, text")
        try:
            return self.replace(
                compressor=name, bits=bits, split_point="connector", text_mode="ids", text_compressor="same",
                text_bits=0, entropy_coding=self.entropy_coding if name in INDEX_COMPRESSORS else "none",
            )
        except ConfigError as err:
            raise ConfigError(f"the {stream} stream (compressor {name!r}, {bits} bits): {err}") from None


_VIT_LN1 = re.compile(r"vit-ln1:(0|[1-9][0-9]{0,3})")
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    want = _TYPES[type_name if isinstance(type_name, str) else type_name.__name__]
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"Config key '{key}' must be a boolean (true/false), got {value!r}.")
    if want is str:
        if not isinstance(value, str):
            raise ConfigError(f"Config key '{key}' must be a string, got {value!r}.")
        return value
    if isinstance(value, bool):
        raise ConfigError(f"Config key '{key}' must be a number, got {value!r}.")
    try:
        if want is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value, 10)
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"Config key '{key}' must be {'an integer' if want is int else 'a number'}, "
            f"got {value!r}."
        ) from None


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"Config key '{key}' is {value!r}; allowed values: {', '.join(allowed)}.")


def _range(key: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    bad = value <= lo if lo_open else value < lo
    if bad or value > hi or value != value:
        left = "(" if lo_open else "["
        raise ConfigError(f"Config key '{key}' is {value!r}; allowed range: {left}{lo}, {hi}].")


def _bits(key: str, compressor: str, bits: int) -> None:
    """Bit widths: rdfsq/fsq/nf 1-8 (scalar grids), topk/vq/identity 1-16."""
    _range(key, bits, 1, 8 if compressor in ("rdfsq", "fsq", "nf") else 16)


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


def _validate(c: SplitConfig) -> None:
    _range("num-server-rounds", c.num_server_rounds, 1, 100_000)
    _range("fraction-train", c.fraction_train, 0.0, 1.0, lo_open=True)
    _range("fraction-evaluate", c.fraction_evaluate, 0.0, 1.0, lo_open=True)
    _range("min-train-clients", c.min_train_clients, 1, 1_000_000)
    _range("local-steps", c.local_steps, 1, 1_000_000)
    _range("steps-per-exchange", c.steps_per_exchange, 1, 4096)
    _range("batch-size", c.batch_size, 1, 65_536)
    _range("lr", c.lr, 0.0, 10.0, lo_open=True)
    _choice("lr-schedule", c.lr_schedule, LR_SCHEDULES)
    _range("warmup-steps", c.warmup_steps, 0, 10_000_000)
    _range("min-lr-ratio", c.min_lr_ratio, 0.0, 1.0)
    _range("weight-decay", c.weight_decay, 0.0, 10.0)
    _range("adam-beta2", c.adam_beta2, 0.0, 0.99999)
    _range("grad-clip", c.grad_clip, 0.0, 1e6)
    _range("seed", c.seed, 0, 2**31 - 1)
    _range("exchange-timeout-s", c.exchange_timeout_s, 0.0, 86_400.0, lo_open=True)
    _range("expected-clients", c.expected_clients, 0, 10_000_000)
    try:
        parse_faults(c.fault_inject)
    except ValueError as err:
        raise ConfigError(f"Config key 'fault-inject': {err}.") from None
    _choice("compressor", c.compressor, COMPRESSORS)
    _bits("bits", c.compressor, c.bits)
    if c.split_point != "connector" and not _VIT_LN1.fullmatch(c.split_point):
        raise ConfigError(
            f"Config key 'split-point' is {c.split_point!r}; allowed values: 'connector' or "
            "'vit-ln1:K' (after LayerNorm 1 of vision block K, e.g. vit-ln1:0)."
        )
    if c.split_block is not None and c.vision_tower == TINY and c.split_block >= c.vision_layers:
        raise ConfigError(
            f"Config key 'split-point' ({c.split_point}) names block {c.split_block} but the vision "
            f"tower has {c.vision_layers} blocks (vision-layers)."
        )
    _choice("rdfsq-stats", c.rdfsq_stats, RDFSQ_STATS)
    _range("rdfsq-alpha", c.rdfsq_alpha, 0.0, 100.0)
    _range("ema-decay", c.ema_decay, 0.0, 0.999999)
    _range("vq-beta", c.vq_beta, 0.0, 100.0)
    _range("vq-kmeans-iters", c.vq_kmeans_iters, 1, 1000)
    _choice("residual-mode", c.residual_mode, RESIDUAL_MODES)
    _choice("residual-compressor", c.residual_compressor, STREAM_COMPRESSORS)
    _bits("residual-bits", c.residual_compressor, c.residual_bits)
    _choice("entropy-coding", c.entropy_coding, ENTROPY_CODINGS)
    if c.entropy_coding != "none" and c.compressor not in INDEX_COMPRESSORS:
        raise ConfigError(
            f"Config key 'entropy-coding' ({c.entropy_coding}) needs a compressor with integer codes "
            f"({', '.join(INDEX_COMPRESSORS)}); compressor is {c.compressor!r}."
        )
    _choice("identity-dtype", c.identity_dtype, IDENTITY_DTYPES)
    _choice("grad-compressor", c.grad_compressor, GRAD_COMPRESSORS)
    _range("grad-bits", c.grad_bits, 1, 8 if c.grad_compressor == "nf" else 16)
    _choice("nf-codebook", c.nf_codebook, NF_CODEBOOKS)
    _range("nf-block", c.nf_block, 1, 1 << 20)
    if c.compressor == "nf" and c.hidden_size % c.nf_block and c.llm == TINY:
        raise ConfigError(f"Config key 'nf-block' ({c.nf_block}) must divide the feature width ({c.hidden_size}).")
    _range("topk-random", c.topk_random, 0.0, 1.0)
    _choice("text-mode", c.text_mode, TEXT_MODES)
    _choice("text-compressor", c.text_compressor, ("same",) + STREAM_COMPRESSORS)
    _range("text-bits", c.text_bits, 0, 16)
    if c.text_mode == "quantized":
        text_name = c.compressor if c.text_compressor == "same" else c.text_compressor
        if text_name not in STREAM_COMPRESSORS:
            raise ConfigError(
                f"Config key 'text-compressor' resolves to {text_name!r}, which cannot quantise text "
                f"embeddings; with text-mode=quantized pick one of {', '.join(STREAM_COMPRESSORS)}."
            )
        _bits("text-bits", text_name, c.text_bits or c.bits)
    _range("feature-noise", c.feature_noise, 0.0, 1e6)
    _choice("image-position", c.image_position, IMAGE_POSITIONS)
    _choice("dataset", c.dataset, DATASETS)
    if c.dataset in ("pathology", "retina", "faces"):
        _range("image-size", c.image_size, *CASE_STUDY_IMAGE_SIZES)
    if c.dataset == "llava-json":
        if not c.data_path and c.tokenizer == "auto":
            raise ConfigError(
                "Config key 'data-path' is required when dataset='llava-json' (or leave it empty, give every "
                "SuperNode its own with --node-config data-path=..., and set 'tokenizer' to a shared directory)."
            )
        if c.data_path and not Path(c.data_path).expanduser().is_file():
            raise ConfigError(f"Config key 'data-path': file {c.data_path!r} does not exist.")
    _range("num-samples", c.num_samples, 2, 10_000_000)
    _range("test-fraction", c.test_fraction, 0.0, 0.9, lo_open=True)
    _choice("partitioner", c.partitioner, PARTITIONERS)
    _range("dirichlet-alpha", c.dirichlet_alpha, 0.0, 1e6, lo_open=True)
    _range("image-size", c.image_size, 8, 4096)
    _choice("on-bad-record", c.on_bad_record, BAD_RECORD_POLICIES)
    _model_ref("vision-tower", c.vision_tower, tiny_ok=True)
    _model_ref("llm", c.llm, tiny_ok=True)
    if c.tokenizer != "auto":
        _model_ref("tokenizer", c.tokenizer, tiny_ok=False)
    _range("hidden-size", c.hidden_size, 8, 16_384)
    if c.vision_tower == TINY and c.hidden_size % 4:
        raise ConfigError(f"Config key 'hidden-size' ({c.hidden_size}) must be divisible by 4 for the tiny vision tower.")
    _range("vision-layers", c.vision_layers, 1, 128)
    _range("llm-lora-rank", c.llm_lora_rank, 0, 4096)
    _range("llm-lora-alpha", c.llm_lora_alpha, 0.0, 1e6, lo_open=True)
    _range("llm-layers", c.llm_layers, 1, 128)
    _range("patch-size", c.patch_size, 1, c.image_size)
    if c.vision_tower == TINY and c.image_size % c.patch_size:
        raise ConfigError(
            f"Config key 'patch-size' ({c.patch_size}) must divide 'image-size' ({c.image_size})."
        )
    _range("max-answer-tokens", c.max_answer_tokens, 1, 512)
    _range("bandwidth-mbps", c.bandwidth_mbps, 0.0, 1e6, lo_open=True)
    _range("rtt-ms", c.rtt_ms, 0.0, 1e6)
    if not c.out_dir:
        raise ConfigError("Config key 'out-dir' is empty.")
    if c.run_name and (c.run_name in ("..",) or "/" in c.run_name.strip("/")):
        raise ConfigError(f"Config key 'run-name' {c.run_name!r} must be a plain name or '.'.")
    _range("client-cpus", c.client_cpus, 0.0, 1024.0, lo_open=True)
    if c.split_block is not None and c.residual_mode == "transmit":
        c.stream_config("residual")  # the residual stream's codec settings must be valid too
    if c.text_mode == "quantized":
        c.stream_config("text")
    _range("eval-batch-size", c.eval_batch_size, 1, 65_536)


DEFAULTS = SplitConfig()
