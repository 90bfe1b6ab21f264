"""Reader and writer for LLaVA-style conversation JSON.

The file is a JSON list of records::

    [{"id": "0", "image": "images/0.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                        {"from": "gpt", "value": "..."}, ...]}, ...]

Image paths are relative to the JSON file's directory, the dataset's folder (absolute
paths allowed). A path that resolves outside that folder (``..``, an absolute path
elsewhere, a symlink pointing out) is refused with :class:`DataError` naming the record,
whatever ``on_bad_record`` says, unless ``allow_outside_paths`` (run-config key
``data-allow-outside-paths``; docs/reliability.md, "Bad local input"): a shared JSON file
must not make a site read files it never meant to share.

Turns must alternate human/gpt starting with human and ending with gpt; the
``<image>`` placeholder is removed from the human text. An optional ``qtype`` (or
``type``) string field sets :attr:`VQAExample.qtype`, else ``"llava"``.

File-level problems (missing JSON file, invalid JSON, not a list) always raise
:class:`DataError`. Record-level problems (no image, missing or unreadable image
file, bad conversations) raise with ``on_bad_record="error"`` or are logged and
skipped with ``"skip"``; every message names the JSON file and the record.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .types import DataError, VQAExample

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_PLACEHOLDER = re.compile(r"\s*" + re.escape(IMAGE_TOKEN) + r"\s*")  # with its surrounding whitespace
BAD_RECORD_POLICIES = ("error", "skip")


class _BadRecord(Exception):
    """Internal: what is wrong with one record."""


def _read_json(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: LLaVA JSON file does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read LLaVA JSON file: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _parse_turns(conv: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(conv, list) or not conv:
        raise _BadRecord("'conversations' must be a non-empty list")
    texts = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise _BadRecord(f"turn {j} must be an object with string 'from' and 'value'")
        want = "human" if j % 2 == 0 else "gpt"
        if turn["from"] != want:
            raise _BadRecord(f"turns must alternate human/gpt starting with human; turn {j} is from {turn['from']!r}")
        texts.append(turn["value"])
    if len(texts) % 2:
        raise _BadRecord("conversation ends with a human turn (no gpt answer)")
    turns = []
    for k in range(0, len(texts), 2):
        human = _PLACEHOLDER.sub(" ", texts[k]).strip()
        gpt = texts[k + 1].strip()
        if not gpt:
            raise _BadRecord(f"turn {k + 1} (gpt) is empty")
        turns.append((human, gpt))
    return tuple(turns)


def _load_image(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise _BadRecord(f"image file {str(path)!r} does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _BadRecord(f"cannot read image {str(path)!r}: {e}") from e
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8).copy()


def _check_inside(img_path: Path, img_ref: str, root: Path, where: str) -> None:
    """Refuse (:class:`DataError`, never skipped) an image path that resolves, symlinks
    followed, outside the dataset folder ``root`` (itself resolved)."""
    try:
        target = img_path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise _BadRecord(f"cannot resolve image path {img_ref!r}: {e}") from e
    if not target.is_relative_to(root):
        raise DataError(f"{where}: image path {img_ref!r} resolves to {str(target)!r}, outside the dataset folder "
                        f"{str(root)!r}; refused whatever on-bad-record says (set data-allow-outside-paths=true "
                        "to allow it)")


def load_llava_json(
    path: str | Path, image_size: int, on_bad_record: str = "error", allow_outside_paths: bool = False
) -> tuple[list[VQAExample], int]:
    """Load a LLaVA conversation JSON file.

    Parameters
    ----------
    path : str or Path
        The JSON file.
    image_size : int
        Images are converted to RGB and resized (bicubic) to ``image_size`` squared.
    on_bad_record : {"error", "skip"}
        Raise :class:`DataError` on a bad record, or log a warning and skip it.
    allow_outside_paths : bool
        Accept image paths that resolve outside the JSON file's folder; when False such a
        record raises :class:`DataError` under either policy.

    Returns
    -------
    examples : list of VQAExample
    skipped : int
        Number of records skipped.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    path = Path(path).expanduser()
    records = _read_json(path)
    root = path.parent
    inside = root.resolve()
    cache: dict[Path, np.ndarray] = {}
    examples: list[VQAExample] = []
    skipped = 0
    for i, rec in enumerate(records):
        rid = rec.get("id") if isinstance(rec, dict) else None
        where = f"{path}: record {i}" + (f" (id={rid!r})" if rid is not None else "")
        try:
            if not isinstance(rec, dict):
                raise _BadRecord(f"record must be a JSON object, got {type(rec).__name__}")
            img_ref = rec.get("image")
            if not isinstance(img_ref, str) or not img_ref.strip():
                raise _BadRecord("record has no 'image' (this project is image-conditioned)")
            img_path = Path(img_ref).expanduser()
            img_path = img_path if img_path.is_absolute() else root / img_path
            if not allow_outside_paths:
                _check_inside(img_path, img_ref, inside, where)
            if "conversations" not in rec:
                raise _BadRecord("record has no 'conversations'")
            turns = _parse_turns(rec["conversations"])
            if img_path not in cache:
                cache[img_path] = _load_image(img_path, image_size)
            qtype = rec.get("qtype", rec.get("type"))
            qtype = qtype.strip() if isinstance(qtype, str) and qtype.strip() else "llava"
            examples.append(VQAExample(cache[img_path], turns, qtype))
        except _BadRecord as e:
            if on_bad_record == "error":
                raise DataError(f"{where}: {e}") from None
            logger.warning("skipping %s: %s", where, e)
            skipped += 1
    if skipped:
        logger.warning("%s: skipped %d of %d records", path, skipped, len(records))
    return examples, skipped


def write_llava_json(examples: list[VQAExample], out_dir: Path, name: str = "data.json") -> Path:
    """Write examples as a LLaVA dataset: PNGs under ``out_dir/images/`` and a JSON file.

    Image paths in the JSON are relative to ``out_dir``; the first human turn gets the
    ``<image>`` placeholder, and each record keeps its ``qtype``.

    Returns
    -------
    Path
        The JSON file written.
    """
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(max(len(examples) - 1, 0))))
    records = []
    for i, ex in enumerate(examples):
        rel = f"images/{i:0{width}d}.png"
        Image.fromarray(np.ascontiguousarray(ex.image)).save(out_dir / rel)
        conv = []
        for k, (human, gpt) in enumerate(ex.turns):
            conv.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{human}" if k == 0 else human})
            conv.append({"from": "gpt", "value": gpt})
        records.append({"id": str(i), "image": rel, "qtype": ex.qtype, "conversations": conv})
    out = out_dir / name
    out.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return out
