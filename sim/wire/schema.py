"""Structural validation of uplink messages, before anything in them is decoded.

A client may be buggy or malicious, so the server checks every reply against the
protocol schema (docs/protocol.md) first and only then hands arrays to the decoders
(``sim/wire/`` and the compressors' server halves, which check exact sizes and
values)::

    RecordDict --validate(schema, expect)--> ok --decoders--> tensors
                     |
                     +-- WireError(reason): the round engine logs it, counts it and drops
                         the client for the round

What :func:`validate` checks:

* **records**: every required config/array record is present and no other record
  is (metric records are never expected);
* **meta**: only allowed keys, each of the allowed type and range (no bools posing as
  ints, no NaN/inf floats, bounded lists); ``round``, ``exchange`` and
  ``partition-id`` must echo the request (:class:`Expect`), so a replayed or
  misrouted reply fails;
* **arrays**: Flower ``Array`` framing is read from the ``.npy`` header *without*
  allocating the array: the header's dtype and shape must equal the declared ones,
  the data length must match them exactly, the dtype must be little-endian, not an
  object, and in the record's allowed set, the element count within the record's
  bound (an oversized payload is rejected before numpy sees it);
* **weights**: exactly the global client-weight names, dtypes and shapes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ConfigRecord, RecordDict

from .arrays import BF16, WireError

INT, FLOAT, INTS, FLOATS, BOOL = "int", "float", "ints", "floats", "bool"


@dataclass(frozen=True)
class Key:
    """One allowed ``meta`` key: its kind and inclusive range (lists: of each item)."""

    kind: str
    lo: float = -math.inf
    hi: float = math.inf
    max_len: int = 0  # lists: most items allowed
    required: bool = True


@dataclass(frozen=True)
class Arrays:
    """One allowed array record."""

    dtypes: frozenset[str]
    max_elements: int  # per array
    names: frozenset[str] | None = None  # allowed names (None: any)
    ndim: int | None = 1
    required: bool = True
    payload: bool = False  # a compressor payload: names are ``codes.*`` or ``side.*``


@dataclass(frozen=True)
class Schema:
    kind: str  # message type, for error messages
    meta: dict[str, Key]
    # allowed array records, or a function of the validated meta that returns them
    arrays: dict[str, Arrays] | Callable[[ConfigRecord], dict[str, Arrays]] = field(default_factory=dict)


@dataclass(frozen=True)
class Expect:
    """What one reply must echo and fit, set by the round engine per exchange."""

    round: int | None = None
    exchange: int | None = None
    partition: int | None = None
    weights: dict[str, tuple[str, tuple[int, ...]]] | None = None  # name -> (dtype, shape)
    max_text_tokens: int = 65_535  # per sample: the LLM's positions minus the image tokens


def weight_spec(weights: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (numpy dtype name, or bfloat16; shape)`` of a torch state dict (for :class:`Expect`)."""
    def name(dtype: torch.dtype) -> str:
        return BF16 if dtype == torch.bfloat16 else str(torch.empty(0, dtype=dtype).numpy().dtype)

    return {k: (name(v.dtype), tuple(v.shape)) for k, v in weights.items()}


def validate(content: RecordDict, schema: Schema, expect: Expect | None = None) -> None:
    """Raise :class:`WireError` naming the first violation of ``schema``."""
    expect = expect or Expect()
    if not isinstance(content, RecordDict):
        raise WireError(f"{schema.kind}: content is {type(content).__name__}, not a RecordDict")
    if content.metric_records:
        raise WireError(f"{schema.kind}: unexpected metric records {sorted(content.metric_records)}")
    extra = set(content.config_records) - {"meta"}
    if extra:
        raise WireError(f"{schema.kind}: unexpected config records {sorted(extra)}")
    if "meta" not in content.config_records:
        raise WireError(f"{schema.kind}: missing record 'meta'")
    _check_meta(schema, content.config_records["meta"], expect)
    allowed = schema.arrays(content.config_records["meta"]) if callable(schema.arrays) else schema.arrays
    extra = set(content.array_records) - set(allowed)
    if extra:
        raise WireError(f"{schema.kind}: unexpected array records {sorted(extra)}")
    for name, spec in allowed.items():
        if name not in content.array_records:
            if spec.required:
                raise WireError(f"{schema.kind}: missing record '{name}'")
            continue
        record = content.array_records[name]
        if name == "weights" and expect.weights is not None:
            _check_weights(schema.kind, record, expect.weights)
            continue
        if not len(record):
            raise WireError(f"{schema.kind}: record '{name}' is empty")
        for aname, arr in record.items():
            _check_array(f"{schema.kind}: {name}.{aname}", aname, arr, spec)


def _check_meta(schema: Schema, meta, expect: Expect) -> None:
    where = f"{schema.kind}: meta"
    unknown = set(meta) - set(schema.meta)
    if unknown:
        raise WireError(f"{where} has unexpected keys {sorted(unknown)}")
    for key, spec in schema.meta.items():
        if key not in meta:
            if spec.required:
                raise WireError(f"{where} is missing '{key}'")
            continue
        _check_value(f"{where} '{key}'", meta[key], spec)
    for key, want in (("round", expect.round), ("exchange", expect.exchange), ("partition-id", expect.partition)):
        if want is not None and key in schema.meta and meta.get(key) != want:
            raise WireError(f"{where} '{key}'={meta.get(key)!r} does not match the request ({want}): stale or replayed reply")


def _check_value(where: str, v, spec: Key) -> None:
    if spec.kind == BOOL:
        if not isinstance(v, bool):
            raise WireError(f"{where} must be a bool, got {type(v).__name__}")
        return
    if spec.kind in (INTS, FLOATS):
        if not isinstance(v, list) or len(v) > spec.max_len:
            raise WireError(f"{where} must be a list of at most {spec.max_len} items")
        items, item_kind = v, INT if spec.kind == INTS else FLOAT
    else:
        items, item_kind = [v], spec.kind
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int if item_kind == INT else (int, float)):
            raise WireError(f"{where} must hold {'integers' if item_kind == INT else 'numbers'}, got {x!r}")
        if not (math.isfinite(x) and spec.lo <= x <= spec.hi):
            raise WireError(f"{where}: {x!r} is outside [{spec.lo}, {spec.hi}] or not finite")


def _header(arr: Array, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """dtype, shape and header length from the ``.npy`` bytes, without reading the data."""
    if arr.stype != "numpy.ndarray" or not isinstance(arr.data, (bytes, bytearray, memoryview)):
        raise WireError(f"{where}: not a numpy-serialised array (stype {arr.stype!r})")
    buf = io.BytesIO(arr.data)
    try:
        major, _ = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf)
    except (ValueError, TypeError, SyntaxError, EOFError, OverflowError) as err:
        raise WireError(f"{where}: undecodable .npy header ({err})") from None
    if fortran and len(shape) > 1:
        raise WireError(f"{where}: Fortran-ordered arrays are not accepted")
    return dtype, tuple(int(s) for s in shape), buf.tell()


def _check_framing(arr: Array, where: str) -> tuple[np.dtype, tuple[int, ...]]:
    dtype, shape, header = _header(arr, where)
    if dtype.hasobject or dtype.byteorder == ">" or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"{where}: dtype {dtype.str} is not a plain little-endian number type")
    declared = "uint16" if arr.dtype == BF16 else arr.dtype  # bf16 travels as its bit patterns (sim/wire/arrays.py)
    if str(dtype) != declared or shape != tuple(arr.shape):
        raise WireError(f"{where}: declared {arr.dtype}{list(arr.shape)} but the data holds {dtype}{list(shape)}")
    count = math.prod(shape)
    if len(arr.data) - header != count * dtype.itemsize:
        raise WireError(f"{where}: {len(arr.data) - header} data bytes for {count} x {dtype} elements")
    return dtype, shape


def _check_array(where: str, name: str, arr: Array, spec: Arrays) -> None:
    if spec.names is not None and name not in spec.names:
        raise WireError(f"{where}: unexpected array (allowed: {', '.join(sorted(spec.names))})")
    if spec.payload and not (name.startswith(("codes.", "side.")) and len(name) > 6):
        raise WireError(f"{where}: payload array names must start with 'codes.' or 'side.'")
    dtype, shape = _check_framing(arr, where)
    if dtype.name not in spec.dtypes:
        raise WireError(f"{where}: dtype {dtype.name} not allowed (allowed: {', '.join(sorted(spec.dtypes))})")
    if spec.ndim is not None and len(shape) != spec.ndim:
        raise WireError(f"{where}: {len(shape)}-D, expected {spec.ndim}-D")
    if math.prod(shape) > spec.max_elements:
        raise WireError(f"{where}: {math.prod(shape)} elements exceed the limit of {spec.max_elements} (oversized payload)")


def _check_weights(kind: str, record, spec: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    names = set(record.keys())
    if names != set(spec):
        missing, extra = sorted(set(spec) - names), sorted(names - set(spec))
        raise WireError(f"{kind}: weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, (dtype, shape) in spec.items():
        got_dtype, got_shape = _check_framing(record[name], f"{kind}: weights.{name}")
        got = BF16 if record[name].dtype == BF16 else got_dtype.name
        if got != dtype or got_shape != shape:
            raise WireError(f"{kind}: weight {name!r} is {got}{list(got_shape)}, expected {dtype}{list(shape)}")


__all__ = ["BOOL", "FLOAT", "FLOATS", "INT", "INTS", "Arrays", "Expect", "Key", "Schema", "validate", "weight_spec"]
