"""Published single-cell foundation models, re-implemented to load their released weights exactly.

This module holds the torch layers the adapter modules share. Each adapter module holds one model's
forward pass, tokenization, loader and plug-in class (``Plugin``), which ``models/<id>/model.py``
subclasses. Attention goes through the suite's path
(:func:`cellarena.zoo.transformer.model.sdpa_attention`): PyTorch's flash kernel on GPU, and whatever
kernel accepts the input on CPU, recorded in the run's ``runtime_json``. The exception is CellPLM,
whose Flowformer layers use a linear attention without a softmax (recorded as ``flow_attention``).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from cellarena.zoo.transformer.model import math_attention, sdpa_attention


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


class SelfAttention(torch.nn.Module):
    """The parameters of ``torch.nn.MultiheadAttention`` (q, k and v stacked in ``in_proj_weight``),
    run through :func:`attend`. ``key_mask`` may also be a float bias added to the logits."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = torch.nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = torch.nn.Linear(d_model, d_model)

    def forward(self, x, key_mask, how):
        b, length, d = x.shape
        qkv = torch.nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out, label = attend(qkv[0], qkv[1], qkv[2], key_mask, how)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, d)), label


class PostNormLayer(torch.nn.Module):
    """``torch.nn.TransformerEncoderLayer`` with its defaults (post-norm, ReLU, LayerNorm eps 1e-5):
    the same parameter names and the same output, attention through :func:`attend`. scGPT,
    scFoundation and UCE were all trained with it (scGPT through flash-attn's equivalent)."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int):
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads)
        self.linear1 = torch.nn.Linear(d_model, d_hid)
        self.linear2 = torch.nn.Linear(d_hid, d_model)
        self.norm1 = torch.nn.LayerNorm(d_model)
        self.norm2 = torch.nn.LayerNorm(d_model)

    def forward(self, x, key_mask, how):
        attended, label = self.self_attn(x, key_mask, how)
        x = self.norm1(x + attended)
        return self.norm2(x + self.linear2(torch.relu(self.linear1(x)))), label


def torch_load(path: Path):
    """(object, how it was unpickled). Tensors and plain containers load with ``weights_only``; a
    file holding other Python objects (a release saved with its config objects) is unpickled in
    full, with a warning, as the original code would load it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "weights_only"
    except pickle.UnpicklingError as exc:
        warnings.warn(f"{path} holds objects beyond tensors and containers ({str(exc).splitlines()[-1][:200]}); "
                      "unpickling it in full", stacklevel=3)
        return torch.load(path, map_location="cpu", weights_only=False), "full"
