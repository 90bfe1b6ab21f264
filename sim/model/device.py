"""Where the model halves compute and in which precision: ``device``, ``server-device``,
``precision``, ``cuda-deterministic``, ``gradient-checkpointing`` (docs/performance.md,
"GPU machines").

* :func:`resolve_device` turns a ``device`` value into a ``torch.device``: ``auto`` is
  CUDA when this process sees a GPU, else the CPU (in a Ray simulation with
  ``client-gpus=0`` Ray hides the GPUs from the ClientApps, so their ``auto`` is the CPU).
* :func:`autocast` is the mixed-precision context of a half: ``fp32`` is no context at all
  (the exact code path of a run without these keys), ``bf16``/``fp16`` are
  ``torch.autocast`` on the half's device. The weights stay fp32 (master weights): only
  the compute inside the towers and the LLM runs in the low precision. The codecs and the
  wire always see fp32 (:func:`full_precision`).
* :func:`enable_checkpointing` is transformers' activation (gradient) checkpointing on a
  tower or an LLM: each block's activations are recomputed in the backward pass instead
  of being kept (Chen et al., "Training Deep Nets with Sublinear Memory Cost", arXiv
  1604.06174).
* :func:`configure_determinism` makes CUDA runs repeatable (cuBLAS workspace, deterministic
  algorithms, no cuDNN autotuning); on the CPU there is nothing to set.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from sim.config import ConfigError, SplitConfig
from sim.config.keys import DEVICE

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CUBLAS_WORKSPACE = ":4096:8"  # what torch's reproducibility notes ask for with use_deterministic_algorithms


def check_device(value: str) -> None:
    """The ``device`` / ``server-device`` syntax (whether it exists is checked where it is used)."""
    if not DEVICE.fullmatch(value):
        raise ValueError(f"{value!r} is not auto, cpu, cuda, cuda:N or mps")


def client_device(cfg: SplitConfig) -> torch.device:
    """The clients' device (``device``), checked against ``precision``."""
    dev = resolve_device(cfg.device, "device")
    check_precision(dev, cfg.precision)
    return dev


def server_device(cfg: SplitConfig) -> torch.device:
    """The server's device (``server-device``, or ``device`` for ``same``), checked against ``precision``."""
    same = cfg.server_device == "same"
    dev = resolve_device(cfg.device if same else cfg.server_device, "device" if same else "server-device")
    check_precision(dev, cfg.precision)
    return dev


def resolve_device(value: str, key: str = "device") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an explicit device must exist here."""
    check_device(value)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(value)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"Config key '{key}' is {value!r} but this process sees no CUDA device (torch "
                              f"{torch.__version__}; a CPU build of torch, or a Ray ClientApp with client-gpus=0).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"Config key '{key}' is {value!r} but there are {torch.cuda.device_count()} CUDA devices.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"Config key '{key}' is {value!r} but MPS is not available here.")
    return dev


def check_precision(device: torch.device, precision: str) -> None:
    """``fp16`` autocast is for accelerators: on the CPU it is slow and needs loss scaling
    for no benefit, so it is refused; ``bf16`` runs on the CPU too (torch's CPU autocast)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"Config key 'precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("Config key 'precision' is fp16 but the device is the CPU; use bf16 (CPU autocast) or fp32 "
                          "there, or a CUDA device.")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The mixed-precision context of a half on ``device`` (no context for ``fp32``)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def full_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast switched off (for the codecs inside an autocast region; no context for ``fp32``)."""
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of a ``transformers`` model (every block; non-reentrant).
    transformers 5 calls it ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
    is its deprecated alias); transformers 4 has only the latter."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    if getattr(model.config, "use_cache", None):  # a KV cache is useless when training and clashes with recomputing
        model.config.use_cache = False


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """Repeatable CUDA runs (torch's "Reproducibility" notes): ``CUBLAS_WORKSPACE_CONFIG``
    (cuBLAS's split reductions; only read before cuBLAS starts, so it is set here, before
    the first model reaches the GPU, unless the environment already sets it),
    ``torch.use_deterministic_algorithms`` (warning, not failing, on an op that has no
    deterministic CUDA kernel), cuDNN without autotuning. TF32 matmuls are left as torch
    sets them (off for matmuls by default): they are repeatable, only less precise."""
    if device.type != "cuda" or not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer; the CPU if it has neither)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
