"""Build a LLaVA-format dataset of real images for the held-out bit sweep.

``python -m experiments.make_heldout --out runs/heldout/pathology`` writes
``images/*.png``, ``make_heldout.json`` (its parameters; a rerun with the same ones
reuses the folder) and ``data.json`` (the LLaVA-1.5 conversation format read by
``dataset=llava-json``) from one of the scikit-image case studies in
:mod:`sim.data.casestudy`: real immunohistochemistry (``pathology``), fundus
(``retina``) or LFW face (``faces``) images that ship inside scikit-image, tiled
and labelled by pixel statistics (scikit-learn, whose bundled digits the issue
suggests, is not a dependency of this project). Deterministic given ``--seed``.

Data flow: ``generate_<kind>_vqa(n, seed, size)`` -> ``write_llava_json`` -> then
``python -m experiments.bitsweep --data-path <out>/data.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KINDS = ("pathology", "retina", "faces")
MANIFEST = "make_heldout.json"  # the parameters a folder was built with


def build(kind: str, out: Path, num_samples: int, seed: int, image_size: int) -> Path:
    """Write the dataset and return the JSON file's path."""
    from sim.data import casestudy
    from sim.data.llava_json import write_llava_json

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    examples = getattr(casestudy, f"generate_{kind}_vqa")(num_samples, seed, image_size)
    return write_llava_json(examples, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.make_heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=KINDS, default="pathology")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/heldout/<kind>)")
    p.add_argument("--num-samples", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    out = args.out or Path("runs/heldout") / args.kind
    params = {"kind": args.kind, "num_samples": args.num_samples, "seed": args.seed, "image_size": args.image_size}
    if (out / "data.json").exists():
        # The build is deterministic: the same parameters give the same files, so they are reused;
        # anything else in the folder (another build, a user's own data) is never overwritten.
        built = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else None
        if built == params:
            print(f"{out / 'data.json'} (already built with these parameters; reused)")
            return 0
        why = "it was not built by this command" if built is None else f"it was built with {built}"
        print(f"error: {out / 'data.json'} exists and {why}; choose another --out", file=sys.stderr)
        return 2
    try:
        path = build(args.kind, out, args.num_samples, args.seed, args.image_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (out / MANIFEST).write_text(json.dumps(params, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
