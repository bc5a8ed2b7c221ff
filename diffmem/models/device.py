"""Where a model runs and in what precision: one home for the ``--device`` and ``--dtype``
choices of every command that opens a model.

:func:`resolve_device` turns a name (``cpu``, ``cuda``, ``cuda:1``, ``mps``; None = CUDA when
available, else CPU) into a :class:`torch.device` that exists on this machine;
:func:`resolve_dtype` turns ``float32``/``float16``/``bfloat16`` into a :class:`torch.dtype`
that the device can run. Either fails with a :class:`~diffmem.errors.ConfigError` that names the
value and what would work. Scores are accumulated in float32 whatever the model's dtype (see
:func:`diffmem.models.noise_gap`), and a seed draws the same initial noise in every precision.

Reduced precision changes the scores' values more than their order. Measured on the embedded
demo model (266 training prompts of ``diffmem synth --preset demo --seed 0``, detect's default
noise settings, CPU): bfloat16 noise magnitudes differ from float32 by a median of 9.6 % and at
most 33 % (the noise gap is a small difference of two large predictions, so rounding in each
shows), while the ranking holds (Spearman 0.997; AUC against the planted labels 1.000 in both).
Compare scores and thresholds only within one precision; a model's fingerprint includes it.
"""

from __future__ import annotations

import torch

from diffmem.errors import ConfigError

__all__ = ["DEVICES", "DTYPES", "resolve_device", "resolve_dtype"]

#: Device kinds a name may start with (an index may follow ``cuda``: ``cuda:1``).
DEVICES = ("cpu", "cuda", "mps")
#: Precision names -> torch dtypes.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device | None = None, *,
                   process_device: torch.device | None = None) -> torch.device:
    """The :class:`torch.device` named ``name``, checked to exist on this machine.

    Parameters
    ----------
    name : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. None (default): ``cuda`` when CUDA is
        available, else ``cpu``.
    process_device : torch.device, optional
        This process's device under ``accelerate launch`` (``PartialState().device``, e.g.
        ``cuda:2`` for the third process): a CUDA one replaces ``None`` and a bare ``"cuda"``,
        so that each process runs on its own GPU.

    Returns
    -------
    torch.device

    Raises
    ------
    ConfigError
        For an unknown name, CUDA or MPS asked for on a machine without it, or a CUDA index
        beyond the devices present.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    diffmem.errors.ConfigError: --device 'tpu' is not a device; use cpu, cuda, cuda:N or mps
    """
    if process_device is not None and torch.device(process_device).type == "cuda" and (
            name is None or str(name).strip().lower() == "cuda"):
        return torch.device(process_device)
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name).strip().lower()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICES or (device.type != "cuda"
                                                          and device.index not in (None, 0)):
        raise ConfigError(f"--device {str(name)!r} is not a device; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text!r}: CUDA is not available on this machine (no "
                              "NVIDIA GPU or a CPU-only PyTorch build); use --device cpu, or "
                              "install a CUDA build of PyTorch on a machine with a GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {text!r}: this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1})")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {text!r}: Apple's MPS backend is not available here; use "
                          "--device cpu" + (" or cuda" if torch.cuda.is_available() else ""))
    return device


def resolve_dtype(name: str | torch.dtype | None = None, *,
                  device: str | torch.device | None = "cpu") -> torch.dtype:
    """The :class:`torch.dtype` named ``name``, checked to run on ``device``.

    Parameters
    ----------
    name : str or torch.dtype, optional
        ``"float32"`` (default when None), ``"float16"`` or ``"bfloat16"``; a floating-point
        torch dtype passes through (``torch.float64`` too, for gradient checks).
    device : str or torch.device, optional
        Where the model will run. float16 is refused on the CPU, where PyTorch lacks or emulates
        half-precision kernels (slow, some ops missing); bfloat16 runs there.

    Returns
    -------
    torch.dtype

    Raises
    ------
    ConfigError
        For an unknown precision (the message lists the known ones) or float16 on the CPU.

    Examples
    --------
    >>> resolve_dtype("bfloat16")
    torch.bfloat16
    >>> resolve_dtype("half")
    Traceback (most recent call last):
    ...
    diffmem.errors.ConfigError: --dtype 'half' is not known; use float32, float16 or bfloat16
    >>> resolve_dtype("float16", device="cpu")
    Traceback (most recent call last):
    ...
    diffmem.errors.ConfigError: --dtype float16 does not run on the CPU (PyTorch has no fast half-precision CPU kernels); use --dtype bfloat16 for reduced precision on the CPU, or --device cuda
    """
    if name is None:
        dtype = torch.float32
    elif isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise ConfigError(f"dtype {name} is not a floating-point type; use "
                              f"{', '.join(f'torch.{n}' for n in DTYPES)}")
        dtype = name
    else:
        key = str(name).strip().lower()
        if key not in DTYPES:
            raise ConfigError(f"--dtype {str(name)!r} is not known; use "
                              f"{', '.join(list(DTYPES)[:-1])} or {list(DTYPES)[-1]}")
        dtype = DTYPES[key]
    if dtype == torch.float16 and device is not None and torch.device(device).type == "cpu":
        raise ConfigError("--dtype float16 does not run on the CPU (PyTorch has no fast "
                          "half-precision CPU kernels); use --dtype bfloat16 for reduced "
                          "precision on the CPU, or --device cuda")
    return dtype
