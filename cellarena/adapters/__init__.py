"""Published single-cell foundation models, re-implemented to load their released weights exactly.

Each module holds one model's forward pass, tokenization and loader; the plug-in in
``models/<id>/model.py`` connects it to the runner. Attention goes through the suite's path
(:func:`cellarena.transformer.model.sdpa_attention`): PyTorch's flash kernel on GPU, and whatever
kernel accepts the input on CPU, recorded in the run's ``runtime_json``.
"""

from __future__ import annotations

import torch

from cellarena.transformer.model import math_attention, sdpa_attention


def attend(q, k, v, key_mask, how: str = "sdpa"):
    """(output, kernel label). ``q, k, v``: (B, H, L, Dh); ``key_mask``: (B, 1, 1, L), True = attend."""
    if how == "math":
        return math_attention(q, k, v, key_mask), "math"
    return sdpa_attention(q, k, v, key_mask)


def split_state(state: dict, model: torch.nn.Module, unused_prefixes: tuple[str, ...], where: str) -> dict:
    """The entries of a released state dict that ``model`` holds, checked strictly: every parameter
    of ``model`` must be there with its shape, and every other entry must belong to a head this
    model does not use (``unused_prefixes``); anything else is an error naming the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(unused_prefixes))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"{where} does not match the architecture: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatches {shapes[:5]}")
    return {k: state[k] for k in own}
