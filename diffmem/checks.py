"""Shared argument checks and small helpers: one home for the rules every package applies.

* :func:`check_int`, :func:`check_positive`, :func:`check_fraction` - a number argument or a
  :class:`~diffmem.errors.ConfigError` that names it, the value received and what would work;
* :func:`as_dataset`, :func:`as_adapter` - a dataset or model given as an object or a path;
* :func:`package_versions` - the versions a result records for reproducibility.

Atomic file writers (:func:`~diffmem.utils.write_json`, :func:`~diffmem.utils.write_csv`) live in
:mod:`diffmem.utils`.

Examples
--------
>>> check_int("steps", 3), check_fraction("p", 0.5), check_positive("lr", 1e-3)
(3, 0.5, 0.001)
>>> check_int("steps", 0)
Traceback (most recent call last):
...
diffmem.errors.ConfigError: steps=0; use an integer >= 1
>>> check_int("seed", True, low=0)
Traceback (most recent call last):
...
diffmem.errors.ConfigError: seed=True; use an integer >= 0
"""

from __future__ import annotations

import importlib.metadata as md
import math
import platform
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from diffmem.errors import ConfigError, DiffMemError

__all__ = ["as_adapter", "as_dataset", "check_fraction", "check_int", "check_positive",
           "number_list", "package_versions"]


def check_int(name: str, value: Any, *, low: int = 1, high: int | None = None, hint: str = "",
              error: type[DiffMemError] = ConfigError) -> int:
    """``value`` as an ``int`` when it is a whole number (not a bool) in ``[low, high]``.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
    low, high : int, optional
        Inclusive bounds (default: at least 1, no upper bound).
    hint : str, optional
        Appended to the message (e.g. ``" (the number of seeds)"``).
    error : DiffMemError subclass, optional
        What to raise (default :class:`ConfigError`).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        want = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise error(f"{name}={value!r}; use {want}{hint}")
    return int(value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) \
        and math.isfinite(float(value))


def check_positive(name: str, value: Any, *, hint: str = "",
                   error: type[DiffMemError] = ConfigError) -> float:
    """``value`` as a ``float`` when it is a finite number > 0 (``hint`` ends the message)."""
    if not _is_number(value) or value <= 0:
        raise error(f"{name}={value!r}; use a finite number > 0{hint}")
    return float(value)


def check_fraction(name: str, value: Any, *, open_low: bool = False, open_high: bool = False,
                   hint: str = "", error: type[DiffMemError] = ConfigError) -> float:
    """``value`` as a ``float`` when it is a number in [0, 1] (``open_low``/``open_high``
    exclude 0/1; ``hint`` ends the message)."""
    lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
    if not _is_number(value) or value < 0 or value > 1 or (open_low and value == 0) \
            or (open_high and value == 1):
        raise error(f"{name}={value!r}; use a number in {lo}0, 1{hi}{hint}")
    return float(value)


def number_list(values: Sequence[Any] | str, *, name: str, cast: Callable[[Any], Any],
                accept: Callable[[Any, Any], bool], expected: str, example: str) -> list[Any]:
    """Distinct numbers from a comma-separated string or a sequence (a CLI option such as
    ``--ranks 4,16``): each item ``cast`` (``int`` or ``float``) and kept when
    ``accept(number, item)``; a ConfigError names ``name``, the bad item, what was
    ``expected`` and ``example``.

    >>> number_list("4, 16", name="--ranks", cast=int, accept=lambda v, x: v >= 1,
    ...             expected="a positive integer", example="--ranks 4,16")
    [4, 16]
    >>> number_list("0.5,2", name="--ratios", cast=float, accept=lambda v, x: v <= 1,
    ...             expected="in [0, 1]", example="--ratios 0,0.5")
    Traceback (most recent call last):
    ...
    diffmem.errors.ConfigError: --ratios: '2' is not in [0, 1]; give for example --ratios 0,0.5
    """
    items = [x.strip() for x in values.split(",") if x.strip()] if isinstance(values, str) \
        else list(values)
    out = []
    for x in items:
        try:
            v = cast(x)
        except (TypeError, ValueError):
            v = None
        if v is None or isinstance(x, bool) or not accept(v, x):
            raise ConfigError(f"{name}: {x!r} is not {expected}; give for example {example}")
        out.append(v)
    if not out:
        raise ConfigError(f"{name}: none given; give for example {example}")
    if len(set(out)) != len(out):
        raise ConfigError(f"{name}: {out} repeats a value; give each once, e.g. {example}")
    return out


def as_dataset(data: Any) -> Any:
    """A :class:`~diffmem.data.CXRDataset`, given one or a dataset path
    (read with :func:`diffmem.data.load`)."""
    from diffmem.data import CXRDataset, load  # here: diffmem.data uses these checks itself

    return data if isinstance(data, CXRDataset) else load(data)


def as_adapter(model: Any, **options: Any) -> Any:
    """A :class:`~diffmem.models.DiffusionModelAdapter`, given one (or an object with its
    ``sample`` and ``fingerprint``), a loaded pipeline or a model folder (read with
    :func:`diffmem.models.load_model`, which takes the ``options``)."""
    from diffmem.models import DiffusionModelAdapter, load_model  # here: models use the checks

    if isinstance(model, DiffusionModelAdapter) or (
            hasattr(model, "sample") and hasattr(model, "fingerprint")):
        return model
    return load_model(model, **options)


def package_versions(*names: str) -> dict[str, str]:
    """Python's version and the installed versions of ``names`` (``"not installed"`` when
    absent), for the reproducibility record of a result."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out
