"""The core run-config keys, each declared once (:class:`sim.settings.Setting`).

A compressor's own keys (``rdfsq-stats``, ``nf-block``, ...) are declared in its module
(``sim/compress/codecs/``). Rules that relate several keys are in :mod:`sim.config.rules`.
The ``[tool.flwr.app.config]`` table of ``pyproject.toml`` and the README's table are
generated from these declarations (``python -m sim docs --write``).
"""

from __future__ import annotations

import re
from pathlib import Path

from sim.compress import codec_names
from sim.settings import Setting

from .faults import parse_faults

TINY = "tiny"
SCRATCH = "scratch"  # init=scratch: random initialisation (the from-scratch regime)
STAGES = ("align", "finetune", "both")
SPLIT_POINT = re.compile(r"vit-ln1:(0|[1-9][0-9]{0,3})")  # vit-ln1:k = after LayerNorm 1 of vision block k
DEVICE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]{0,2}))?|mps")  # the device keys' syntax (sim/model/device.py)
PRECISIONS = ("fp32", "bf16", "fp16")
IMAGE_POSITIONS = ("first", "after-question", "before-last-token")
DATASETS = ("synthetic", "llava-json", "pathology", "retina", "faces")
CASE_STUDIES = ("pathology", "retina", "faces")


def _split_point(value: str) -> None:
    if value != "connector" and not SPLIT_POINT.fullmatch(value):
        raise ValueError(f"{value!r} is not 'connector' or 'vit-ln1:K' (after LayerNorm 1 of vision block K, e.g. vit-ln1:0)")


def _device(value: str) -> None:
    if not DEVICE.fullmatch(value):
        raise ValueError(f"{value!r} is not auto, cpu, cuda, cuda:N or mps")


def _server_device(value: str) -> None:
    if value != "same":
        _device(value)


def _fault_spec(value: str) -> None:
    parse_faults(value)


def _not_empty(value: str) -> None:
    if not value:
        raise ValueError("it is empty")


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_init_dir(value: str) -> Path:
    """An ``init`` directory: absolute as given; relative to the working directory when it
    exists there, else to the project (so the shipped ``checkpoints/`` resolve from anywhere,
    Ray workers and ``flwr run`` included)."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return PROJECT_ROOT / p


def _init_ref(value: str) -> None:
    if not value:
        raise ValueError(f"it is empty; give '{SCRATCH}' or a checkpoint directory made by `python -m sim pretrain`")


def _run_name(value: str) -> None:
    if value and (value == ".." or "/" in value.strip("/")):
        raise ValueError(f"{value!r} must be a plain name or '.'")


# --- the default job ----------------------------------------------------------------------
# With no overrides a run is split fine-tuning of the shipped pretrained tiny VLM on the
# pathology case study, TinyLLaVA's two stages (README, docs/foundation.md). Its budget is
# here, in one place, to be retuned after measurement; the keys below take their defaults
# from it, and tests read "the default" from the declarations, never these numbers.
DEFAULT_INIT = "checkpoints/tiny-vlm"  # relative: resolved by resolve_init_dir, from any working directory
DEFAULT_DATASET = "pathology"
DEFAULT_STAGE = "both"
DEFAULT_BUDGET: dict[str, int] = {
    "num-server-rounds": 8,
    "align-rounds": 1,  # of the 8: one align round, then fine-tuning
    "local-steps": 60,
    "steps-per-exchange": 30,
    "warmup-steps": 10,
    "align-batch-size": 8,
}
# The default job's downlink, chosen by `python -m experiments.traffic` (issue 17,
# experiments/results/traffic.md): the align round's gradients as rank-4 factors, then the
# client half frozen (no gradients at all): 0.4 points below fp32 gradients down, paired
# over 3 seeds, at about a tenth of the bytes.
DEFAULT_GRAD_COMPRESSOR = "lowrank"
DEFAULT_CLIENT_FINETUNE = "frozen"

# The from-scratch regime: the values the default job changed (random initialisation,
# synthetic data, the finetune stage and the old budget; RD-FSQ's `rdfsq-send-range`, a
# codec key, is on by default now). The committed from-scratch results (experiments/results/,
# docs/results-spine.md) and the tests that train tiny models from scratch run on these:
# `SplitConfig.from_run_config({**FROM_SCRATCH, ...})`. Fixed, so those results stay reproducible.
FROM_SCRATCH: dict[str, object] = {
    "init": SCRATCH, "dataset": "synthetic", "stage": "finetune",
    "num-server-rounds": 10, "local-steps": 200, "steps-per-exchange": 20, "warmup-steps": 100,
    "align-batch-size": 32, "rdfsq-send-range": False, "grad-compressor": "none", "client-finetune": "train",
}

S = Setting
CORE: tuple[Setting, ...] = (
    # --- federation and optimisation ---------------------------------------------------------
    S("num-server-rounds", DEFAULT_BUDGET["num-server-rounds"], "federated rounds", lo=1, hi=100_000),
    S("fraction-train", 1.0, "fraction of clients sampled per round (seeded)", lo=0.0, hi=1.0, lo_open=True),
    S("fraction-evaluate", 1.0, "fraction of clients that run split inference each round (seeded; all at 1.0)",
      lo=0.0, hi=1.0, lo_open=True),
    S("min-train-clients", 1, "a round with fewer live clients is skipped", lo=1, hi=1_000_000),
    S("local-steps", DEFAULT_BUDGET["local-steps"], "micro-batches per client per round", lo=1, hi=1_000_000),
    S("steps-per-exchange", DEFAULT_BUDGET["steps-per-exchange"], "micro-batches per message exchange (see staleness "
      "in docs/protocol.md)", lo=1, hi=4096),
    S("frozen-steps-per-exchange", 0, "micro-batches per exchange in a round whose client half is frozen "
      "(`client-finetune=frozen`): no gradients go down, so the grouping changes no feature and no result, only "
      "the number of messages (and their size); 0 = the round's `local-steps` in one exchange (docs/protocol.md)",
      lo=0, hi=1_000_000),
    S("batch-size", 8, "micro-batch size per client", lo=1, hi=65_536),
    S("lr", 5e-4, "AdamW peak learning rate on both sides (1e-3 made RD-FSQ at 2 bits unstable, docs/results-spine.md)",
      lo=0.0, hi=10.0, lo_open=True),
    S("lr-schedule", "cosine", "per-step rate: linear warm-up over `warmup-steps`, then cosine decay to "
      "`min-lr-ratio`·`lr` at the last step (`constant`: always `lr`)", choices=("cosine", "constant")),
    S("warmup-steps", DEFAULT_BUDGET["warmup-steps"], "linear warm-up steps of the cosine schedule", lo=0,
      hi=10_000_000),
    S("min-lr-ratio", 0.1, "the cosine schedule's final rate as a fraction of `lr`", lo=0.0, hi=1.0),
    S("weight-decay", 0.0, "AdamW weight decay on both sides", lo=0.0, hi=10.0),
    S("adam-beta2", 0.999, "AdamW's beta2 on both sides (0.95 with grad-clip 1.0 did not make higher rates work, "
      "docs/results-spine.md)", lo=0.0, hi=0.99999),
    S("grad-clip", 0.0, "per-step gradient-norm clip on both sides (0 = off)", lo=0.0, hi=1e6),
    S("seed", 0, "all randomness (init, data, sampling)", lo=0, hi=2**31 - 1),
    S("exchange-timeout-s", 600.0, "per-exchange reply timeout; late clients are dropped for the round",
      lo=0.0, hi=86_400.0, lo_open=True),
    S("expected-clients", 0, "the ServerApp waits for this many SuperNodes before round 1 (`python -m sim run` sets "
      "it to `--clients`)", lo=0, hi=10_000_000),
    S("fault-inject", "", "fault injection for reliability tests, off when empty: `raise@P:R:E` (partition P raises "
      "in round R, exchange E or `eval`), `delay@P:R:E:S` (replies S seconds late); docs/reliability.md",
      check=_fault_spec),
    S("checkpoint", True, "save `checkpoint.pt` in the run directory after every round (and each client's optimiser "
      "state under `client-state/` or the SuperNode's `state-dir`), so the run can be resumed"),
    S("resume", False, "continue the run in `out-dir/run-name` from its `checkpoint.pt` (the rest of the config must "
      "equal the checkpoint's); `python -m sim run --resume DIR` and `python -m sim deploy --resume DIR` set it, "
      "`flwr run` takes it in `--run-config` (docs/reliability.md)"),
    # --- compression -----------------------------------------------------------------------
    S("compressor", "rdfsq", "the uplink codec of the image features: a registered codec serving the image stream "
      "(`python -m sim codecs` lists them; docs/compressors.md)", choices=lambda: codec_names("image"),
      allowed_text="a codec serving `image`"),
    S("bits", 2, "bits per feature value (per token for `vq`); each codec's range: `python -m sim codecs`"),
    S("split-point", "connector", "`connector` (after the connector, Quantized-TinyLLaVA) or `vit-ln1:K` (after "
      "LayerNorm 1 of vision block K, AlignedVQ; the server runs the rest of the tower and the connector; SigLIP "
      "towers)", check=_split_point),
    S("residual-mode", "rebuild", "at `vit-ln1:K`: `rebuild` the block's residual from the decoded features (no extra "
      "bytes, what AlignedVQ's byte count implies) or `transmit` a compressed copy", choices=("rebuild", "transmit")),
    S("residual-compressor", "nf", "codec of the transmitted residual (a codec serving the residual stream)",
      choices=lambda: codec_names("residual"), allowed_text="a codec serving `residual`"),
    S("residual-bits", 4, "bits of the transmitted residual (the residual codec's range)"),
    S("entropy-coding", "none", "`ans` (constriction ANS, one histogram per message) or `zstd` on the integer codes "
      "of every stream whose codec has them; bytes counted as sent", choices=("none", "ans", "zstd")),
    S("grad-compressor", DEFAULT_GRAD_COMPRESSOR, "codec of the downlink gradients (a codec serving the gradient stream; `none`: fp32)",
      choices=lambda: codec_names("gradient"), allowed_text="a codec serving `gradient`"),
    S("grad-bits", 4, "bits of the downlink gradient codec (its range)"),
    S("grad-entropy-coding", "none", "`ans` (constriction ANS, one histogram per message) or `zstd` on the downlink "
      "gradient codec's integer codes (`stochastic`, `nf`); bytes counted as sent", choices=("none", "ans", "zstd")),
    S("grad-error-feedback", False, "error feedback on the downlink: the server keeps each client's compression "
      "residual and adds it to the next exchange's gradients before compressing them (the residual of one sample "
      "goes to another's gradient; docs/compressors.md)"),
    S("text-mode", "ids", "`ids`: text goes up as token ids (the server sees questions and answers); `quantized`: the "
      "client embeds the text with a frozen copy of the LLM's embedding table and sends it through a separate "
      "quantiser, only the answers go up as ids (labels); docs/compressors.md says what each reveals",
      choices=("ids", "quantized")),
    S("text-compressor", "same", "codec of the quantised text (`same` = `compressor`; a codec serving the text stream)",
      choices=lambda: ("same", *codec_names("text")), allowed_text="`same`, or a codec serving `text`"),
    S("text-bits", 0, "bits of the quantised text (0 = `bits`)", lo=0, hi=16),
    S("feature-noise", 0.0, "sigma of Gaussian noise the client adds to its pre-quantisation features (a privacy "
      "defence; seeded per image, 0 = off; docs/privacy.md)", lo=0.0, hi=1e6),
    S("feature-noise-clip", 0.0, "L2 bound C on each image's pre-quantisation features before the noise (0 = off); "
      "with C > 0 the noise is fresh per release and summary.json reports its (ε, δ) (docs/privacy.md)",
      lo=0.0, hi=1e6),
    S("feature-noise-delta", 1e-5, "the δ at which summary.json reports the feature noise's ε", lo=0.0, hi=0.5,
      lo_open=True),
    S("nopeek-weight", 0.0, "NoPeek's lambda: the client adds lambda·dCor(pixels, pre-compressor features) to its "
      "training loss (a privacy defence, arXiv 2008.09161; 0 = off; docs/privacy.md)", lo=0.0, hi=1e6),
    S("image-position", "after-question", "`after-question` (image tokens right after the first question), "
      "`before-last-token` (the same, but the question's last token follows the image and reads the answer out) or "
      "`first` (LLaVA order)", choices=IMAGE_POSITIONS),
    # --- data ------------------------------------------------------------------------------
    S("dataset", DEFAULT_DATASET, "`synthetic` (procedural VQA), `llava-json`, or a privacy case study built offline from "
      "scikit-image images: `pathology`, `retina`, `faces`; docs/privacy.md", choices=DATASETS),
    S("data-path", "", "LLaVA-format JSON file (required for `llava-json`; or empty, with each SuperNode's own file in "
      "`--node-config data-path=...` and a shared `tokenizer` directory, docs/deployment.md)"),
    S("num-samples", 6000, "size of the synthetic dataset (all clients together)", lo=2, hi=10_000_000),
    S("test-fraction", 0.1, "each client's local test split", lo=0.0, hi=0.9, lo_open=True),
    S("partitioner", "iid", "`iid` or `dirichlet` (on the answer), via `flwr-datasets`", choices=("iid", "dirichlet")),
    S("dirichlet-alpha", 0.5, "Dirichlet concentration", lo=0.0, hi=1e6, lo_open=True),
    S("image-size", 32, "image side in pixels", lo=8, hi=4096),
    S("on-bad-record", "error", "bad LLaVA records (missing or unreadable image, malformed conversation): `error` "
      "stops with the file and record named; `skip` skips and counts them (`bad_records` in summary.json)",
      choices=("error", "skip")),
    S("data-allow-outside-paths", False, "let LLaVA records name images outside the JSON file's folder (`..`, absolute "
      "paths, symlinks resolving elsewhere); off, such a record stops the run with the file, record and path named, "
      "whatever `on-bad-record` says (docs/reliability.md)"),
    # --- model -----------------------------------------------------------------------------
    S("vision-tower", TINY, "`tiny` (built from config) or a local directory / hub id (`from_pretrained`)"),
    S("llm", TINY, "`tiny` or a local directory / hub id"),
    S("tokenizer", "auto", "`auto` (word-level, built from the data) or a directory / hub id"),
    S("hidden-size", 128, "tiny model width", lo=8, hi=16_384),
    S("vision-layers", 2, "tiny vision tower blocks", lo=1, hi=128),
    S("llm-layers", 2, "tiny LLM layers", lo=1, hi=128),
    S("patch-size", 4, "tiny vision tower patch side (32x32 images, patch 4: 64 image tokens)", lo=1, hi=4096),
    S("init", DEFAULT_INIT, "`scratch` (random initialisation) or a pretrained checkpoint directory made by `python -m "
      "sim pretrain`, by default the shipped one (relative paths: to the working directory, else to the project; "
      "its `vision_tower/`, `llm/`, `tokenizer/` and connector replace `tiny`/`auto`; docs/foundation.md)",
      check=_init_ref),
    S("stage", DEFAULT_STAGE, "what trains (TinyLLaVA's two stages): `align` (connector + compressor, the LLM frozen; "
      "`align-lr`, `align-batch-size`), `finetune` (the LLM too, full or LoRA; `lr`, `batch-size`) or `both` "
      "(`align-rounds` rounds of `align`, then `finetune`)", choices=STAGES),
    S("client-finetune", DEFAULT_CLIENT_FINETUNE, "what the client half does in the `finetune` stage: `train` (the connector and "
      "compressor keep learning from the downlink's gradients) or `frozen` (they stay as the align stage left them: "
      "the server sends no gradients and the clients send no weights back; docs/compressors.md)",
      choices=("train", "frozen")),
    S("align-rounds", DEFAULT_BUDGET["align-rounds"], "rounds of the align stage when `stage=both`", lo=1, hi=100_000),
    S("align-lr", 5e-4, "peak learning rate of the align stage (Quantized-TinyLLaVA: 5e-4)", lo=0.0, hi=10.0,
      lo_open=True),
    S("align-batch-size", DEFAULT_BUDGET["align-batch-size"], "micro-batch size per client in the align stage "
      "(Quantized-TinyLLaVA uses 32)", lo=1, hi=65_536),
    S("train-vision-tower", "auto", "train the vision tower on the clients: `auto` = only from scratch (a pretrained "
      "tower stays frozen, as in the papers)", choices=("auto", "true", "false")),
    S("llm-lora-rank", 0, "LoRA adapters (`peft`, every linear layer but the head) on the LLM; 0 = full fine-tuning",
      lo=0, hi=4096),
    S("llm-lora-alpha", 16.0, "LoRA alpha", lo=0.0, hi=1e6, lo_open=True),
    S("max-answer-tokens", 4, "generation length at evaluation", lo=1, hi=512),
    # --- network model and output ------------------------------------------------------------
    S("bandwidth-mbps", 10.0, "network model: each client costs `rtt + down·8/downlink + up·8/uplink` per exchange "
      "(parallel clients take the max); the bandwidth of both directions unless `uplink-mbps` / `downlink-mbps` "
      "set one (docs/protocol.md)", lo=0.0, hi=1e6, lo_open=True),
    S("uplink-mbps", 0.0, "network model: client -> server bandwidth (0 = `bandwidth-mbps`)", lo=0.0, hi=1e6),
    S("downlink-mbps", 0.0, "network model: server -> client bandwidth (0 = `bandwidth-mbps`)", lo=0.0, hi=1e6),
    S("rtt-ms", 20.0, "network model round-trip time per exchange", lo=0.0, hi=1e6),
    S("out-dir", "runs", "results go to `out-dir/run-name`", check=_not_empty),
    S("run-name", "", "the run directory's name (empty: `<time>-<compressor>-b<bits>`)", check=_run_name),
    # --- simulation resources ----------------------------------------------------------------
    S("client-cpus", 1.0, "Ray CPUs per simulated client: with `C` cores, `C / client-cpus` clients compute at once, "
      "each with `floor(client-cpus)` torch threads (docs/reliability.md)", lo=0.0, hi=1024.0, lo_open=True),
    S("eval-batch-size", 64, "server batch for split inference", lo=1, hi=65_536),
    # --- device and precision (sim/model/device.py; docs/performance.md, GPU machines) ----------------
    S("device", "auto", "where the clients' half computes (models, batches, codec buffers): `auto` (CUDA when the "
      "process sees a GPU, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`; the server's too unless `server-device` "
      "is set", check=_device, allowed_text="`auto`, `cpu`, `cuda`, `cuda:N`, `mps`"),
    S("server-device", "same", "where the server's half (codec server halves, vision tail, LLM) computes: `same` (= "
      "`device`) or a device as for `device`", check=_server_device, allowed_text="`same`, or as `device`"),
    S("client-gpus", 0.0, "Ray GPUs per simulated client (fractions share a GPU); with 0 Ray hides the GPUs from the "
      "ClientApps, so their `device=auto` is the CPU", lo=0.0, hi=64.0),
    S("precision", "fp32", "compute precision of the towers and the LLM: `fp32`, or `bf16`/`fp16` autocast with fp32 "
      "master weights (`fp16` needs an accelerator and scales its losses; codecs and the wire stay fp32)",
      choices=PRECISIONS),
    S("gradient-checkpointing", False, "recompute each tower and LLM block in the backward pass instead of keeping "
      "its activations (transformers' activation checkpointing): less memory, ~1/3 more compute"),
    S("cuda-deterministic", True, "on CUDA: deterministic algorithms, `CUBLAS_WORKSPACE_CONFIG=:4096:8`, no cuDNN "
      "autotuning, so a seeded run repeats (docs/performance.md); no effect on the CPU"),
)
