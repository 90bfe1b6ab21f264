"""``python -m experiments.bench --gpu [--quick] [--device D]``: the split step on an accelerator.

Ready for a GPU machine (docs/performance.md, "GPU machines"); it runs on any device, and
CI runs it with ``--device cpu`` (memory is then n/a). It measures

* **throughput** — training samples per second of split steps through the in-process round
  engine (:func:`sim.training.reference.run_reference`: the real client handlers, codec,
  wire and ledger; the clients one after another) for the tiny from-scratch pair and every
  real-size pair of :mod:`experiments.real_size` (at ``split-point=connector``); the last
  of 2 rounds is timed, so CUDA's start-up and cuBLAS's first calls are not;
* **GPU memory** — ``torch.cuda.max_memory_allocated`` over that run;
* **the codecs' share** of the round's time: every codec half's ``forward``, ``pack`` and
  ``unpack`` and the gradient codec's ``encode_gradient`` / ``decode_gradient``, timed at
  their outermost call (with ``torch.cuda.synchronize`` on CUDA, so the time is the
  kernels', not their launch);
* **P1 on the device** — the Flower simulation's throughput ÷ the in-process reference's
  (:func:`experiments.bench_sim.p1_protocol_efficiency`) on the tiny pair, the ClientApps
  given ``client-gpus`` = 1/clients each on CUDA.

It writes ``gpu_bench.csv`` and ``gpu_bench.md`` (the device named) into ``--out``.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from . import bench_sim, real_size
from .common import SCRATCH

TINY = {**SCRATCH, "checkpoint": False, "batch-size": 8, "warmup-steps": 0}
QUICK_TINY = {**TINY, "hidden-size": 32, "image-size": 16, "patch-size": 4, "num-samples": 120, "vision-layers": 1,
              "llm-layers": 1}


class CodecTimer:
    """Wall time inside the codecs (outermost calls only), by patching their classes."""

    METHODS = ("forward", "pack", "unpack", "encode_gradient", "decode_gradient")

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._sync()
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds += time.perf_counter() - t0
                self.calls += 1
                self._depth -= 1
        return timed

    @contextlib.contextmanager
    def patched(self) -> Iterator[CodecTimer]:
        from sim.compress import ClientCodec, Codec, ServerCodec, codec_names, get_codec

        classes: set[type] = set()
        for name in codec_names():
            codec = get_codec(name)
            for cls in (codec, codec.Client, codec.Server):
                if cls is not None:
                    classes |= {c for c in cls.__mro__ if issubclass(c, (Codec, ClientCodec, ServerCodec))}
        saved = []
        for cls in classes:
            for m in self.METHODS:
                if m in cls.__dict__:
                    saved.append((cls, m, cls.__dict__[m]))
                    setattr(cls, m, self._wrap(cls.__dict__[m]))
        try:
            yield self
        finally:
            for cls, m, fn in saved:
                setattr(cls, m, fn)


def throughput(label: str, config: dict, clients: int) -> dict:
    """Samples/s of the last round, peak GPU memory and the codecs' share of that round."""
    import torch

    from sim.config import SplitConfig
    from sim.model.device import client_device
    from sim.training.reference import run_reference

    cfg = SplitConfig.from_run_config(config)
    dev = client_device(cfg)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timer = CodecTimer(str(dev))
    with timer.patched():
        res = run_reference(cfg, num_partitions=clients, evaluate_rounds=False)
    last = res.reports[-1]
    codec_s_total = timer.seconds
    # the codec time of the timed (last) round: its share of every round's codec time, by steps
    share = codec_s_total / sum(r.train_s for r in res.reports)
    return {
        "figure": "throughput", "setting": label, "device": str(dev), "clients": clients, "batch_size": cfg.batch_size,
        "steps": cfg.local_steps, "samples_per_s": last.samples / last.train_s, "round_train_s": last.train_s,
        "gpu_peak_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else float("nan"),
        "codec_share": share, "codec_calls": timer.calls, "loss": res.step_losses[-1],
    }


def run(quick: bool, out: Path, batch: int = 1, device: str = "auto", repeats: int = 1, p1: bool = True,
        pairs: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Every measurement of the module docstring; writes ``gpu_bench.{csv,md}`` into ``out``."""
    from sim.config import SplitConfig
    from sim.model.device import client_device

    t0 = time.perf_counter()
    dev = str(client_device(SplitConfig.from_run_config({"device": device})))
    steps = 2 if quick else 16
    tiny = {**(QUICK_TINY if quick else TINY), "num-server-rounds": 2, "local-steps": steps,
            "steps-per-exchange": steps, "device": device}
    rows = [throughput("tiny from-scratch pair", tiny, 2)]
    towers, llms = (real_size.QUICK_TOWERS, real_size.QUICK_LLMS) if quick else (real_size.TOWERS, real_size.LLMS)
    pairs = pairs if pairs is not None else [(t, m) for t in towers for m in llms]
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        root = Path(tmp)
        dirs = {"tokenizer": str(real_size.save_tokenizer(root))}
        for t, m in pairs:
            for name in (t, m):
                if name not in dirs:
                    dirs[name] = str(real_size.save_tower(name, towers[name], root) if name in towers
                                     else real_size.save_llm(name, *llms[name], root))
            config = real_size.row_config(real_size.Row(t, m, "connector"), dirs, towers, batch, device)
            config |= {"num-server-rounds": 2, "local-steps": 2 if quick else 4, "steps-per-exchange": 2 if quick else 4}
            rows.append(throughput(f"{t} x {m}", config, 1))
    if p1:
        clients = 2
        sim_cfg = {**tiny, "num-server-rounds": 1}
        if dev.startswith("cuda"):
            sim_cfg["client-gpus"] = 1.0 / clients
        for r in bench_sim.p1_protocol_efficiency(sim_cfg, clients, repeats, f"tiny pair, {clients} clients"):
            rows.append({**r, "figure": "P1", "device": dev})
    df = pd.DataFrame(rows)
    cmd = "python -m experiments.bench --gpu" + (" --quick" if quick else "") + f" --device {device}"
    write_report(df, out, cmd, time.perf_counter() - t0, dev)
    return df


def write_report(df: pd.DataFrame, out: Path, command: str, wall_s: float, device: str) -> None:
    from .common import table_cell as _fmt
    from .real_size import machine_info

    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "gpu_bench.csv", index=False)
    name = device
    if device.startswith("cuda"):
        import torch

        name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    lines = [f"# Split steps on {name}", "",
             f"Command: `{command}` ({wall_s / 60:.1f} min). Machine: "
             + ", ".join(f"{k} {v}" for k, v in machine_info().items()) + ".", "",
             ("Throughput: training samples/s of the last of 2 rounds of in-process split steps (the real round engine, "
              "handlers, codec RD-FSQ b=2, wire, ledger). `gpu_peak_gb`: torch.cuda.max_memory_allocated (n/a off "
              "CUDA). `codec_share`: the codecs' share of the rounds' train_s. P1: Flower simulation ÷ in-process "
              "reference throughput on the device (experiments/bench_gpu.py)."), ""]
    cols = ["setting", "device", "clients", "batch_size", "steps", "samples_per_s", "round_train_s", "gpu_peak_gb",
            "codec_share", "loss"]
    thr = df[df["figure"] == "throughput"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in thr.iterrows():
        lines.append("| " + " | ".join("n/a" if c == "gpu_peak_gb" and r[c] != r[c] else _fmt(r[c]) for c in cols) + " |")
    p1 = df[df["figure"] == "P1"]
    if len(p1):
        pc = ["setting", "repeat", "value", "sim_samples_per_s", "ref_samples_per_s", "runtime_s_per_exchange"]
        lines += ["", "## P1 (simulation ÷ reference) on the device", "", "| " + " | ".join(pc) + " |", "|" + "---|" * len(pc)]
        lines += ["| " + " | ".join(_fmt(r[c]) for c in pc) + " |" for _, r in p1.iterrows()]
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
