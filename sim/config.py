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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


COMPRESSORS = ("identity", "rdfsq", "fsq", "nf", "topk")
GRAD_COMPRESSORS = ("none", "fp16", "topk", "nf")
NF_CODEBOOKS = ("seed", "qlora")
RDFSQ_STATS = ("global", "per-dim")
IDENTITY_DTYPES = ("fp16", "bf16", "fp32")
LR_SCHEDULES = ("cosine", "constant")
SPLIT_POINTS = ("connector",)
TEXT_MODES = ("ids",)
IMAGE_POSITIONS = ("first", "after-question")
DATASETS = ("synthetic", "llava-json")
PARTITIONERS = ("iid", "dirichlet")
BAD_RECORD_POLICIES = ("error", "skip")
TINY = "tiny"


@dataclass(frozen=True)
class SplitConfig:
    """All settings of one run. Field ``foo_bar`` is run-config key ``foo-bar``."""

    # --- federation and optimisation -------------------------------------------------
    num_server_rounds: int = 10
    fraction_train: float = 1.0
    min_train_clients: int = 1
    local_steps: int = 200
    steps_per_exchange: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    exchange_timeout_s: float = 600.0
    expected_clients: int = 0
    # --- compression -----------------------------------------------------------------
    compressor: str = "rdfsq"
    bits: int = 2
    split_point: str = "connector"
    rdfsq_stats: str = "per-dim"
    rdfsq_alpha: float = 0.0
    identity_dtype: str = "fp16"
    nf_block: int = 64
    nf_codebook: str = "seed"
    nf_double_quant: bool = False
    topk_random: float = 0.1
    grad_compressor: str = "none"
    grad_bits: int = 4
    text_mode: str = "ids"
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
    _range("min-train-clients", c.min_train_clients, 1, 1_000_000)
    _range("local-steps", c.local_steps, 1, 1_000_000)
    _range("steps-per-exchange", c.steps_per_exchange, 1, 4096)
    _range("batch-size", c.batch_size, 1, 65_536)
    _range("lr", c.lr, 0.0, 10.0, lo_open=True)
    _choice("lr-schedule", c.lr_schedule, LR_SCHEDULES)
    _range("warmup-steps", c.warmup_steps, 0, 10_000_000)
    _range("min-lr-ratio", c.min_lr_ratio, 0.0, 1.0)
    _range("weight-decay", c.weight_decay, 0.0, 10.0)
    _range("seed", c.seed, 0, 2**31 - 1)
    _range("exchange-timeout-s", c.exchange_timeout_s, 0.0, 86_400.0, lo_open=True)
    _range("expected-clients", c.expected_clients, 0, 10_000_000)
    _choice("compressor", c.compressor, COMPRESSORS)
    if c.compressor in ("rdfsq", "fsq", "nf"):
        _range("bits", c.bits, 1, 8)
    else:
        _range("bits", c.bits, 1, 16)
    _choice("split-point", c.split_point, SPLIT_POINTS)
    _choice("rdfsq-stats", c.rdfsq_stats, RDFSQ_STATS)
    _range("rdfsq-alpha", c.rdfsq_alpha, 0.0, 100.0)
    _choice("identity-dtype", c.identity_dtype, IDENTITY_DTYPES)
    _choice("grad-compressor", c.grad_compressor, GRAD_COMPRESSORS)
    _range("grad-bits", c.grad_bits, 1, 8 if c.grad_compressor == "nf" else 16)
    _choice("nf-codebook", c.nf_codebook, NF_CODEBOOKS)
    _range("nf-block", c.nf_block, 1, 1 << 20)
    if c.compressor == "nf" and c.hidden_size % c.nf_block and c.llm == TINY:
        raise ConfigError(f"Config key 'nf-block' ({c.nf_block}) must divide the feature width ({c.hidden_size}).")
    _range("topk-random", c.topk_random, 0.0, 1.0)
    _choice("text-mode", c.text_mode, TEXT_MODES)
    _choice("image-position", c.image_position, IMAGE_POSITIONS)
    _choice("dataset", c.dataset, DATASETS)
    if c.dataset == "llava-json":
        if not c.data_path:
            raise ConfigError("Config key 'data-path' is required when dataset='llava-json'.")
        if not Path(c.data_path).expanduser().is_file():
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
    _range("eval-batch-size", c.eval_batch_size, 1, 65_536)


DEFAULTS = SplitConfig()
