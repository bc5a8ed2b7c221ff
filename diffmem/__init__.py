"""diffmem: find, explain and mitigate training-data memorization in text-to-image diffusion
models for medical imaging (chest X-rays and their reports)."""

from diffmem.errors import DiffMemError

__version__ = "0.1.0"

__all__ = ["DiffMemError", "__version__"]
