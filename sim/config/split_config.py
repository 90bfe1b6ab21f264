"""The typed, validated run configuration, generated from the declared settings.

Flower hands the app a flat ``run_config`` mapping with kebab-case keys
(``[tool.flwr.app.config]`` in ``pyproject.toml`` plus ``--run-config`` overrides).
:class:`SplitConfig` has one frozen field per key: the core keys of
:mod:`sim.config.keys` and every registered codec's settings (``sim/compress/codecs/``).
:meth:`SplitConfig.from_run_config` is the one place that mapping is parsed: it rejects
unknown keys (typos), coerces strings from the command line, and checks every value,
raising :class:`ConfigError` that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sim.compress import Codec, codec_names, get_codec
from sim.settings import ConfigError, Setting, codec_settings, same_declaration

from .keys import CORE, SCRATCH, SPLIT_POINT, TINY, resolve_init_dir
from .rules import RULES


def _declared() -> dict[str, Setting]:
    """Every key: the core ones, then each codec's (a key several codecs share, such as
    ``ema-decay``, must be declared identically by each of them)."""
    out = {s.key: s for s in CORE}
    for name in codec_names():
        for _, s in codec_settings(name, get_codec(name).Settings):
            old = out.get(s.key)
            if old is None:
                out[s.key] = s
            elif old.group == "core" or not same_declaration(old, s):
                raise ValueError(f"config key {s.key!r} of codec {name!r} clashes with its declaration by {old.group!r}")
            else:
                out[s.key] = dataclasses.replace(old, group=f"{old.group}, {name}")
    return out


SETTINGS: dict[str, Setting] = _declared()
"""Every run-config key, by name, in declaration order."""


class _SplitConfigMethods:
    """Methods of :class:`SplitConfig` (its fields are generated from :data:`SETTINGS`)."""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | None = None) -> SplitConfig:
        """Build and validate a config from a kebab-case mapping (unknown keys fail)."""
        kwargs: dict[str, Any] = {}
        for key, raw in (run_config or {}).items():
            if key not in SETTINGS:
                close = difflib.get_close_matches(key, list(SETTINGS), 3)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise ConfigError(f"Unknown config key '{key}'.{hint}")
            setting = SETTINGS[key]
            kwargs[setting.attr] = setting.coerce(raw)
        return cls(**kwargs)

    def __post_init__(self) -> None:
        for setting in SETTINGS.values():
            setting.validate(getattr(self, setting.attr))
        for rule in RULES:
            rule(self)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping Flower uses (inverse of :meth:`from_run_config`)."""
        return {key: getattr(self, s.attr) for key, s in SETTINGS.items()}

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
        m = SPLIT_POINT.fullmatch(self.split_point)
        return int(m.group(1)) if m else None

    # ---- model sources and stages (docs/foundation.md) -------------------------------------------
    @property
    def init_dir(self) -> Path | None:
        """The pretrained checkpoint directory of ``init`` (None for ``scratch``)."""
        return None if self.init == SCRATCH else resolve_init_dir(self.init)

    def _from_init(self, part: str, value: str, default: str) -> str:
        root = self.init_dir
        return str(root / part) if root is not None and value == default else value

    @property
    def vision_tower_source(self) -> str:
        """``vision-tower``, or the checkpoint's ``vision_tower/`` when ``init`` is one and the key is ``tiny``."""
        return self._from_init("vision_tower", self.vision_tower, TINY)

    @property
    def llm_source(self) -> str:
        """``llm``, or the checkpoint's ``llm/`` (as for the tower)."""
        return self._from_init("llm", self.llm, TINY)

    @property
    def tokenizer_source(self) -> str:
        """``tokenizer``, or the checkpoint's ``tokenizer/`` when ``init`` is one and the key is ``auto``."""
        return self._from_init("tokenizer", self.tokenizer, "auto")

    @property
    def trains_vision_tower(self) -> bool:
        """``train-vision-tower``; ``auto`` trains it only from scratch."""
        return self.train_vision_tower == "true" or (self.train_vision_tower == "auto" and self.init == SCRATCH)

    def stage_at(self, rnd: int) -> str:
        """``align`` or ``finetune``: the stage of round ``rnd`` (1-based)."""
        if self.stage == "both":
            return "align" if rnd <= self.align_rounds else "finetune"
        return self.stage

    def client_trains_at(self, rnd: int) -> bool:
        """Whether the client half trains in round ``rnd``: always in ``align``; in
        ``finetune`` unless ``client-finetune=frozen`` (then no gradients go down)."""
        return self.stage_at(rnd) == "align" or self.client_finetune == "train"

    def batch_size_at(self, rnd: int) -> int:
        """The micro-batch size of round ``rnd``: ``align-batch-size`` in the align stage, else ``batch-size``."""
        return self.align_batch_size if self.stage_at(rnd) == "align" else self.batch_size

    # ---- codecs -----------------------------------------------------------------------------
    def stream_codec(self, stream: str) -> tuple[str, int]:
        """``(codec name, bits)`` of a stream: ``image`` (``compressor``/``bits``), ``residual``
        (``residual-compressor``/``residual-bits``), ``text`` (``text-compressor``/``text-bits``;
        ``same``/0 reuse the image ones) or ``gradient`` (``grad-compressor``/``grad-bits``)."""
        if stream == "image":
            return self.compressor, self.bits
        if stream == "residual":
            return self.residual_compressor, self.residual_bits
        if stream == "text":
            return (self.compressor if self.text_compressor == "same" else self.text_compressor), (self.text_bits or self.bits)
        if stream == "gradient":
            return self.grad_compressor, self.grad_bits
        raise ValueError(f"unknown stream {stream!r}; valid: image, residual, text, gradient")

    def codec_settings(self, name: str) -> Any:
        """Codec ``name``'s settings dataclass, filled from this config's keys."""
        codec = get_codec(name)
        return codec.Settings(**{f: getattr(self, s.attr) for f, s in codec_settings(name, codec.Settings)})

    def codec(self, stream: str, dim: int) -> Codec:
        """The codec definition of ``stream`` for features of width ``dim``."""
        name, bits = self.stream_codec(stream)
        return get_codec(name)(dim, bits, self.codec_settings(name), self.seed)

    def grad_codec(self) -> Codec:
        """The downlink gradient codec (``grad-compressor`` at ``grad-bits``); it reads the
        shapes from the gradients it encodes."""
        name, bits = self.stream_codec("gradient")
        return get_codec(name)(0, bits, self.codec_settings(name), self.seed)

    def entropy(self, stream: str) -> str:
        """The entropy coding of a stream's integer codes (``none`` for codecs without them)."""
        return self.entropy_coding if get_codec(self.stream_codec(stream)[0]).integer_codes else "none"


def _make_class() -> type:
    fields = [(s.attr, s.type, dataclasses.field(default=s.default)) for s in SETTINGS.values()]
    cls = dataclasses.make_dataclass("SplitConfig", fields, bases=(_SplitConfigMethods,), frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = "All settings of one run. Field ``foo_bar`` is run-config key ``foo-bar`` (:data:`SETTINGS`)."
    return cls


SplitConfig = _make_class()
