"""A pretrained checkpoint directory: what ``python -m sim pretrain`` writes and ``init=<dir>`` loads.

Layout (every part loads with the library's own ``from_pretrained``)::

    <dir>/vision_tower/      SiglipVisionModel.save_pretrained (safetensors) + the tower's
                             image processor (preprocessor_config.json)
    <dir>/llm/               the causal LM (save_pretrained, safetensors)
    <dir>/tokenizer/         the tokenizer (save_pretrained; with its chat template)
    <dir>/connector.safetensors   TinyLLaVA's 2-layer MLP connector (safetensors.torch)
    <dir>/manifest.json      command, config, data, seed, steps, final metrics, and the
                             sha256 of every other file

It is the project's stand-in for the public weights a user downloads (docs/foundation.md).
:func:`verify_checkpoint` re-hashes the files against the manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VISION_DIR, LLM_DIR, TOKENIZER_DIR = "vision_tower", "llm", "tokenizer"
CONNECTOR_FILE, MANIFEST_FILE = "connector.safetensors", "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but the manifest, by POSIX relative path, sorted."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    return {p.relative_to(root).as_posix(): sha256(p) for p in files}


def save_checkpoint(
    out: Path, tower: nn.Module, connector: nn.Module, llm: nn.Module, tokenizer: Any, processor: Any,
    manifest: dict[str, Any],
) -> Path:
    """Write the checkpoint directory (see the module docstring); returns the manifest path."""
    out.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(out / VISION_DIR, safe_serialization=True)
    processor.save_pretrained(out / VISION_DIR)
    llm.save_pretrained(out / LLM_DIR, safe_serialization=True)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    save_file({k: v.detach().contiguous() for k, v in connector.state_dict().items()}, str(out / CONNECTOR_FILE))
    manifest = {**manifest, "files": file_hashes(out)}
    path = out / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(root: Path) -> dict[str, Any]:
    return json.loads((Path(root) / MANIFEST_FILE).read_text())


def verify_checkpoint(root: Path) -> list[str]:
    """The files whose sha256 differs from the manifest's, or that are missing or extra (empty: intact)."""
    root = Path(root)
    want, have = read_manifest(root).get("files", {}), file_hashes(root)
    bad = [f"{name}: missing" for name in sorted(set(want) - set(have))]
    bad += [f"{name}: not in the manifest" for name in sorted(set(have) - set(want))]
    bad += [f"{name}: sha256 differs" for name in sorted(set(want) & set(have)) if want[name] != have[name]]
    return bad


def load_connector(root: Path, connector: nn.Module) -> None:
    """Load the checkpoint's connector weights into ``connector`` (strict; shapes must match)."""
    state = load_file(str(Path(root) / CONNECTOR_FILE))
    own = connector.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise ValueError(f"{root}/{CONNECTOR_FILE} does not fit the connector: it holds {shapes}")
    with torch.no_grad():
        connector.load_state_dict(state)
