"""The synthetic generator's bytes do not depend on the CPU's SIMD level.

numpy picks its exp/pow/sin kernels by CPU (SSE4, AVX2, AVX-512); in float32 their last-bit
differences changed rendered JPEG bytes from one machine to the next, and with them the data
fingerprint the embedded default model and encoder record. The renderer works in float64, where
such differences stay far below an 8-bit grey level. This test renders the same films
under two numpy dispatch levels (``NPY_DISABLE_CPU_FEATURES``) in subprocesses and compares them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = """
import sys
import numpy as np
from diffmem.data.synth.anatomy import random_anatomy, random_pose, render_chest
from diffmem.data.synth.findings import Findings
rng = np.random.default_rng(7)
films = []
for i in range(6):
    view = "AP" if i % 2 else "PA"
    anatomy = random_anatomy(rng, sex="F" if i % 3 else "M")
    films.append(render_chest(anatomy, Findings(), view=view, pose=random_pose(rng, view=view),
                              size=96, noise_seed=i, device_seed=i))
np.save(sys.argv[1], np.stack(films))
"""


def _found_simd() -> list[str]:
    from numpy._core._multiarray_umath import __cpu_features__  # numpy >= 2

    return [name for name, on in __cpu_features__.items() if on]


def test_rendered_films_do_not_depend_on_simd_level(tmp_path):
    """Every float32 pixel is the same under the native kernels and under SSE-level ones."""
    if "AVX2" not in _found_simd():
        pytest.skip("this CPU has no AVX2: both runs would use the same kernels")
    films = {}
    for label, disabled in (("native", ""), ("sse", "X86_V3")):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("NPY_DISABLE_CPU_FEATURES", None)
        if disabled:
            env["NPY_DISABLE_CPU_FEATURES"] = disabled
        path = tmp_path / f"{label}.npy"
        subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True,
                       capture_output=True, timeout=600)
        films[label] = np.load(path)
    assert films["native"].shape == (6, 96, 96) and films["native"].std() > 0.05
    assert np.array_equal(films["native"], films["sse"])
