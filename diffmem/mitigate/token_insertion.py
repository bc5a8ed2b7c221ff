"""Random token insertion (Somepalli et al., NeurIPS 2023, "random token addition")."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffmem.mitigate._text import insertable_ids
from diffmem.mitigate.registry import row_seed
from diffmem.models import SamplingHooks

NAME = "random_token_insertion"


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """Random token insertion (Somepalli et al., NeurIPS 2023): ``strength`` token ids drawn
    uniformly from the vocabulary (special and marker tokens excluded) inserted at random
    positions between the start and the end token of the tokenized prompt, which is then
    re-encoded. Works on token ids, so any tokenizer gets real vocabulary tokens. When the
    prompt gets longer than the encoder reads, its last prompt tokens are dropped and the end
    token kept. Strength 0 leaves the embedding as it is.
    """
    n = int(strength)
    vocab = insertable_ids(adapter) if n else np.zeros(0, dtype=np.int64)
    pad = adapter.tokenizer.pad_token_id
    pad = int(pad if pad is not None else adapter.tokenizer.eos_token_id)

    def prompt_embeds(cond, uncond, prompts, generators):
        if n == 0 or len(vocab) == 0:
            return cond, uncond
        tokens = adapter.tokenize(prompts)
        ids_out, mask_out = [], []
        for row, g in enumerate(generators):
            rng = np.random.default_rng(row_seed(seed, NAME, g))
            length = int(tokens["attention_mask"][row].sum())
            ids = tokens["input_ids"][row, :length].tolist()
            body, end = ids[1:-1], ids[-1:]
            for tid in vocab[rng.integers(0, len(vocab), size=n)]:
                body.insert(int(rng.integers(0, len(body) + 1)), int(tid))
            new = (ids[:1] + body)[:adapter.max_length - 1] + end
            ids_out.append(new + [pad] * (adapter.max_length - len(new)))
            mask_out.append([1] * len(new) + [0] * (adapter.max_length - len(new)))
        ids_t = torch.tensor(ids_out, dtype=torch.long, device=adapter.device)
        mask_t = torch.tensor(mask_out, dtype=torch.long, device=adapter.device)
        return adapter.encode_tokens(ids_t, mask_t).to(cond), uncond

    return SamplingHooks(prompt_embeds=prompt_embeds)
