"""Schema checks for the content of model and cache files, run when the file is read.

Each check returns the value in the form the caller uses (a float array, a LightGBM booster) or raises
:class:`SchemaError` with one line that names the field and what is wrong with it: missing, of the wrong
JSON type, of the wrong shape, holding null/text/NaN/infinite values, a scale that is not positive, a
LightGBM model that reads another number of features. Model loaders turn it into a one-line
:class:`~cspml_flows.core.errors.ModelError` naming the file; cache readers rebuild the cache.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lightgbm as lgb
import numpy as np
from pymatgen.core import Element

from cspml_flows.core.errors import ModelError
from cspml_flows.core.safeio import read_json_gz

T = TypeVar("T")

_JSON_KINDS = {dict: "a mapping", list: "a list", str: "text", bool: "true/false", type(None): "null"}
_EXPECTED = {**_JSON_KINDS, int: "a number", float: "a number"}


class SchemaError(ValueError):
    """A field of a model or cache file that does not match its schema."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def kind(value: Any) -> str:
    """How a JSON value is described in messages (``null``, ``text``, ``a list`` ...)."""
    for t, name in _JSON_KINDS.items():
        if type(value) is t:
            return name
    return "a number" if isinstance(value, int | float | np.number) else type(value).__name__


def field(blob: Any, key: str, types: type | tuple[type, ...], where: str = "", optional: bool = False) -> Any:
    """``blob[key]`` if it is one of ``types`` (``optional``: absent or null gives None)."""
    name = f"{where}{key}"
    if not isinstance(blob, dict):
        raise SchemaError(f"{where.rstrip('.') or 'the file'} is {kind(blob)}, expected a mapping")
    value = blob.get(key)
    if value is None and optional:
        return None
    if key not in blob:
        raise SchemaError(f"field {name} is missing")
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        expected = " or ".join(dict.fromkeys(_EXPECTED.get(t, t.__name__) for t in allowed))
        raise SchemaError(f"field {name} is {kind(value)}, expected {expected}")
    return value


def number(name: str, value: Any) -> float:
    """A finite JSON number (not true/false)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        shown = value if isinstance(value, float) else kind(value)
        raise SchemaError(f"field {name} is {shown}, expected a finite number")
    return float(value)


def numbers(name: str, value: Any, shape: tuple[int | None, ...], positive: bool = False) -> np.ndarray:
    """``value`` (nested JSON lists or an array) as a float array of ``shape`` (``None``: any length) whose
    entries are all finite, and all above zero with ``positive`` (a standard deviation or scale)."""
    if value is None or isinstance(value, str | bytes | dict | bool | int | float):
        raise SchemaError(f"field {name} is {kind(value)}, expected an array of numbers")
    try:
        arr = np.asarray(value)
    except ValueError:
        raise SchemaError(f"field {name} is not a rectangular array") from None
    if arr.dtype.kind not in "iuf":
        nulls = arr.dtype.kind == "O" and any(v is None for v in arr.ravel().tolist())
        held = "null" if nulls else {"U": "text", "S": "text", "b": "true/false"}.get(arr.dtype.kind, "non-numbers")
        raise SchemaError(f"field {name} holds {held} where numbers belong")
    fits = arr.ndim == len(shape) and all(w is None or w == g for w, g in zip(shape, arr.shape, strict=True))
    if not fits:
        raise SchemaError(f"field {name} has shape {_shape(arr.shape)}, expected {_shape(shape)}")
    arr = arr.astype(float)
    if not np.isfinite(arr).all():
        raise SchemaError(f"field {name} holds NaN or infinite values")
    if positive and not (arr > 0).all():
        raise SchemaError(f"field {name} holds a zero or negative scale (a standard deviation must be positive)")
    return arr


def _shape(shape: tuple[int | None, ...]) -> str:
    """``(3, 4)`` as ``3 x 4``, ``(5,)`` as ``5``, ``()`` as ``a single value``; None reads ``n``."""
    return " x ".join("n" if s is None else str(s) for s in shape) or "a single value"


def element_values(name: str, value: Any) -> dict[str, float]:
    """A mapping of element symbols to positive finite numbers (per-element volumes)."""
    if not isinstance(value, dict):
        raise SchemaError(f"field {name} is {kind(value)}, expected a mapping of element symbols to numbers")
    for symbol, v in value.items():
        if not (isinstance(symbol, str) and Element.is_valid_symbol(symbol)):
            raise SchemaError(f"field {name} has the key {symbol!r}, which is not an element symbol")
        if number(f"{name}.{symbol}", v) <= 0:
            raise SchemaError(f"field {name}.{symbol} is {v}, expected a positive number")
    return value


def texts(name: str, value: Any, n: int | None = None) -> np.ndarray:
    """A one-dimensional text array (of length ``n`` if given), as cache files store ids and digests."""
    arr = np.asarray(value)
    if arr.dtype.kind != "U" or arr.ndim != 1 or (n is not None and len(arr) != n):
        count = "" if n is None else f"{n} "
        raise SchemaError(f"field {name} is not a list of {count}texts")
    return arr


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: LightGBM's C++ code prints ``[LightGBM] [Fatal]`` there before
    raising, which would add a second line to a one-line error."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 (or a replaced sys.stderr): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def booster(name: str, text: Any, n_features: int) -> lgb.Booster:
    """A LightGBM booster parsed from its text model, which must read exactly ``n_features`` features."""
    if not isinstance(text, str):
        raise SchemaError(f"field {name} is {kind(text)}, expected a LightGBM text model")
    try:
        with _native_stderr_silenced():
            model = lgb.Booster(model_str=text)
    except Exception as exc:  # LightGBM's parser raises assorted errors: each one is reported as a SchemaError
        raise SchemaError(f"field {name} is not a LightGBM model ({first_line(exc)})") from None
    got = model.num_feature()
    if got != n_features:
        raise SchemaError(f"field {name} is a LightGBM model of {got} features, this version computes {n_features}")
    return model


def read_model_file(path: str | Path, what: str, key: str, hint: str, versions: dict[str, Any]) -> dict[str, Any]:
    """The content of a gzipped-JSON model file (never unpickled), checked to be a cspml-flows ``what`` file.

    A mapping with ``key`` whose ``meta`` mapping carries exactly these ``versions``; every problem is one
    ModelError naming the file (``hint`` says how to make one).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{what} file not found: {p} ({hint})")
    try:
        blob = read_json_gz(p)
    except (OSError, EOFError, ValueError, zlib.error):
        raise ModelError(
            f"cannot read {what} file {p}: not a gzipped-JSON cspml-flows {what} ({what} files made before format "
            f"{versions['format']} were pickles and are never loaded: {hint})"
        ) from None
    if not isinstance(blob, dict) or key not in blob:
        raise ModelError(f"{p} is not a cspml-flows {what} file ({hint})")
    meta = blob.get("meta")
    if not isinstance(meta, dict):
        problem = f"is {kind(meta)}, expected a mapping" if "meta" in blob else "is missing"
        raise ModelError(f"damaged {what} data in {p}: field meta {problem}")
    got = {k: meta.get(k) for k in versions}
    if got != versions:
        raise ModelError(f"{what} {p} was made with {got}; this version needs {versions}: retrain it")
    return blob


def load_model_file(
    path: str | Path, what: str, key: str, hint: str, versions: dict[str, Any], build: Callable[[dict[str, Any]], T]
) -> T:
    """``build`` of a :func:`read_model_file` content; a SchemaError or ModelError becomes one naming the file."""
    blob = read_model_file(path, what, key, hint, versions)
    try:
        return build(blob)
    except SchemaError as exc:
        raise ModelError(f"damaged {what} data in {path}: {exc}") from None
    except ModelError as exc:
        raise ModelError(f"{what} file {path}: {exc}") from None
