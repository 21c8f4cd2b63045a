"""Releases with random weights in each model's official file layout, for ``cellarena validate``, the
tests and benchmarks at published sizes.

A writer per adapter family (:func:`write_scgpt`, :func:`write_geneformer`, :func:`write_uce`,
:func:`write_scfoundation`, :func:`write_cellplm`) writes every file of the release, every key of
its state dicts (the heads the cell embedding does not use included), values drawn from a generator
seeded with ``seed``, and a vocabulary made of the caller's ``genes``. The folder is marked as random
(:func:`~cellarena.zoo.adapters.releases.mark_random_release`): its files are checked for presence
only, and runs on it record ``random_weights: true``. Sizes: the family's ``*_TEST_SIZES``, small
enough for tests and ``cellarena validate``, which check the code path, not the numbers; or its
``*_PUBLISHED_SIZES``, the released architecture, to time the real forward pass
(benchmarks/adapter_throughput.py). :func:`write_release` picks the writer for a plug-in class.

This module imports the adapter modules; they never import it.
"""

from __future__ import annotations

import json
import math
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from cellarena.zoo.adapters import cellplm, geneformer, scfoundation, scgpt, uce
from cellarena.zoo.adapters.releases import mark_random_release


def _normal(g: torch.Generator):
    """A function drawing tensors of the given shape from ``g``: normal, scaled by 0.2."""

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    return rnd


def _post_norm_layer(p: str, d: int, d_hid: int, rnd,
                     qkv: tuple[str, str] = ("self_attn.in_proj_weight", "self_attn.in_proj_bias")) -> dict:
    """The entries of one ``nn.TransformerEncoderLayer`` under the prefix ``p``; ``qkv``: the names of
    the stacked query, key and value projection (weight, bias)."""
    return {p + qkv[0]: rnd(3 * d, d), p + qkv[1]: rnd(3 * d),
            p + "self_attn.out_proj.weight": rnd(d, d), p + "self_attn.out_proj.bias": rnd(d),
            p + "linear1.weight": rnd(d_hid, d), p + "linear1.bias": rnd(d_hid),
            p + "linear2.weight": rnd(d, d_hid), p + "linear2.bias": rnd(d),
            p + "norm1.weight": 1 + rnd(d), p + "norm1.bias": rnd(d),
            p + "norm2.weight": 1 + rnd(d), p + "norm2.bias": rnd(d)}


def _made_up_ensembl_ids(n: int) -> list[str]:
    """``n`` Ensembl-like gene ids (``ENSG9...``) that no real gene has."""
    return [f"ENSG9{i:010d}" for i in range(n)]


# --- scGPT: d_model, heads, feed-forward, layers
SCGPT_TEST_SIZES = (16, 2, 32, 2)
SCGPT_PUBLISHED_SIZES = (512, 8, 512, 12)  # the whole-human release's args.json (embsize, nheads, d_hid, nlayers)


def write_scgpt(folder: Path, genes, *, seed: int = 0, attention_names: str = "flash",
                sizes: tuple[int, int, int, int] = SCGPT_TEST_SIZES) -> Path:
    """``best_model.pt``, ``vocab.json`` and ``args.json`` of the whole-human release: flash-attn
    parameter names (``attention_names="torch"``: PyTorch's ``in_proj`` names), decoder heads
    included, the vocabulary ``genes``."""
    D, HEADS, D_HID, LAYERS = sizes  # noqa: N806
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {g: i for i, g in enumerate(genes)}
    for token in scgpt.SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    rnd = _normal(torch.Generator().manual_seed(seed))
    v = len(vocab)
    state = {"encoder.embedding.weight": rnd(v, D), "encoder.enc_norm.weight": 1 + rnd(D),
             "encoder.enc_norm.bias": rnd(D), "value_encoder.linear1.weight": rnd(D, 1),
             "value_encoder.linear1.bias": rnd(D), "value_encoder.linear2.weight": rnd(D, D),
             "value_encoder.linear2.bias": rnd(D), "value_encoder.norm.weight": 1 + rnd(D),
             "value_encoder.norm.bias": rnd(D)}
    qkv = ("self_attn.Wqkv.weight", "self_attn.Wqkv.bias") if attention_names == "flash" else \
        ("self_attn.in_proj_weight", "self_attn.in_proj_bias")
    for i in range(LAYERS):
        state.update(_post_norm_layer(f"transformer_encoder.layers.{i}.", D, D_HID, rnd, qkv))
    state.update({"decoder.fc.0.weight": rnd(D, D), "decoder.fc.0.bias": rnd(D), "decoder.fc.2.weight": rnd(D, D),
                  "decoder.fc.2.bias": rnd(D), "decoder.fc.4.weight": rnd(1, D), "decoder.fc.4.bias": rnd(1),
                  "cls_decoder._decoder.0.weight": rnd(D, D), "cls_decoder.out_layer.weight": rnd(1, D),
                  "mvc_decoder.gene2query.weight": rnd(D, D), "mvc_decoder.W.weight": rnd(D, D)})
    torch.save(state, folder / "best_model.pt")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "args.json").write_text(json.dumps({
        "embsize": D, "nheads": HEADS, "d_hid": D_HID, "nlayers": LAYERS, "n_layers_cls": 3, "dropout": 0.2,
        "pad_token": "<pad>", "pad_value": -2, "mask_value": -1, "n_bins": 51, "input_emb_style": "continuous",
        "fast_transformer": True}))
    return mark_random_release(folder)


# --- Geneformer, by version: hidden size, heads, feed-forward size, layers, input size (max_position_embeddings)
GENEFORMER_TEST_SIZES = {"V1": (16, 2, 32, 2, 256), "V2": (24, 3, 48, 3, 256)}
GENEFORMER_PUBLISHED_SIZES = {"V1": (256, 4, 512, 6, 2048), "V2": (768, 12, 3072, 12, 4096)}  # V1-10M, V2-104M
GENEFORMER_CORPUS_TAG = {"V1": "gc30M", "V2": "gc104M"}  # the suffix of the release's dictionary files


def write_geneformer(folder: Path, genes, *, seed: int = 0, version: str = "V2",
                     sizes: dict = GENEFORMER_TEST_SIZES, weights: str = "safetensors") -> Path:
    """A release folder in the published layout of Geneformer ``version`` ("V1": Geneformer-V1-10M,
    "V2": Geneformer-V2-104M): ``config.json``, the weights (``weights`` "safetensors" writes
    ``model.safetensors``, "bin" ``pytorch_model.bin``, "both" both), the four dictionaries under
    their versioned names; random medians, sizes ``sizes[version]``. ``genes`` are symbols: each gets
    a made-up Ensembl id in ``gene_name_id_dict``. V1 files hold ``bert.embeddings.position_ids``
    (transformers 4.6 saved it), V2 files do not; ``.bin`` files keep the tied decoder weights that
    ``.safetensors`` files drop."""
    d, heads, d_ff, layers, max_positions = sizes[version]
    tag = GENEFORMER_CORPUS_TAG[version]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if version == "V2" else [])
    ensembl = _made_up_ensembl_ids(len(genes))
    token_dict = {t: i for i, t in enumerate(specials)} | {e: len(specials) + i for i, e in enumerate(ensembl)}
    rng = np.random.default_rng(seed)
    medians = {e: float(m) for e, m in zip(ensembl, rng.lognormal(0.0, 1.0, len(ensembl)), strict=True)}
    dictionaries = {"token_dictionary": token_dict, "gene_median_dictionary": medians,
                    "gene_name_id_dict": dict(zip(map(str, genes), ensembl, strict=True)),
                    "ensembl_mapping_dict": {e: e for e in ensembl}}
    for stem, content in dictionaries.items():
        with open(folder / f"{stem}_{tag}.pkl", "wb") as f:
            pickle.dump(content, f)
    config = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.02 if version == "V1" else 0.1,
              "hidden_act": "relu", "hidden_dropout_prob": 0.02 if version == "V1" else 0.1, "hidden_size": d,
              "initializer_range": 0.02, "intermediate_size": d_ff, "layer_norm_eps": 1e-12,
              "max_position_embeddings": max_positions, "model_type": "bert", "num_attention_heads": heads,
              "num_hidden_layers": layers, "pad_token_id": 0, "position_embedding_type": "absolute",
              "type_vocab_size": 2, "use_cache": True, "vocab_size": len(token_dict)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    rnd = _normal(torch.Generator().manual_seed(seed))
    v = len(token_dict)
    state = {"bert.embeddings.word_embeddings.weight": rnd(v, d),
             "bert.embeddings.position_embeddings.weight": rnd(max_positions, d),
             "bert.embeddings.token_type_embeddings.weight": rnd(2, d),
             "bert.embeddings.LayerNorm.weight": 1 + rnd(d), "bert.embeddings.LayerNorm.bias": rnd(d)}
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            state.update({f"{p}{name}.weight": rnd(d, d), f"{p}{name}.bias": rnd(d)})
        state.update({f"{p}attention.output.LayerNorm.weight": 1 + rnd(d),
                      f"{p}attention.output.LayerNorm.bias": rnd(d),
                      f"{p}intermediate.dense.weight": rnd(d_ff, d), f"{p}intermediate.dense.bias": rnd(d_ff),
                      f"{p}output.dense.weight": rnd(d, d_ff), f"{p}output.dense.bias": rnd(d),
                      f"{p}output.LayerNorm.weight": 1 + rnd(d), f"{p}output.LayerNorm.bias": rnd(d)})
    state.update({"cls.predictions.bias": rnd(v), "cls.predictions.transform.dense.weight": rnd(d, d),
                  "cls.predictions.transform.dense.bias": rnd(d),
                  "cls.predictions.transform.LayerNorm.weight": 1 + rnd(d),
                  "cls.predictions.transform.LayerNorm.bias": rnd(d)})
    if version == "V1":
        state[geneformer.POSITION_IDS] = torch.arange(max_positions).unsqueeze(0)
    if weights in ("safetensors", "both"):
        save_file({k: t.contiguous() for k, t in state.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    if weights in ("bin", "both"):
        tied = {"cls.predictions.decoder.weight": state["bert.embeddings.word_embeddings.weight"],
                "cls.predictions.decoder.bias": state["cls.predictions.bias"]}
        torch.save(state | tied, folder / "pytorch_model.bin")
    return mark_random_release(folder)


# --- UCE
UCE_TEST_SIZES = uce.Sizes(24, 40, 48, 2, 32, 16, (24, 16, 8))  # d_model a multiple of the 20 heads
UCE_PUBLISHED_SIZES = uce.Sizes(5120, 1280, 5120, 4, 1024, 1280, (2048, 512, 128))  # 4layer_model.torch
UCE_CHROMOSOMES = {"frog": ("1", "2"), "human": ("1", "10", "2", "X"), "mouse": ("1", "X")}  # genes go round them


def uce_position_table(n_positions: int, d_model: int) -> torch.Tensor:
    """The released position table, (n_positions, 1, d_model): sin on even, cos on odd features, wavelengths
    geometric from 2*pi to 10000*2*pi."""
    angle = torch.arange(n_positions).unsqueeze(1) * torch.exp(
        torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, 1, d_model)
    table[:, 0, 0::2] = torch.sin(angle)
    table[:, 0, 1::2] = torch.cos(angle)
    return table


def write_uce(folder: Path, genes, *, seed: int = 0, sizes: uce.Sizes = UCE_TEST_SIZES,
              weights: str = uce.WEIGHTS) -> Path:
    """The state dict (every released key, the unused heads included) under the name ``weights``,
    ``all_tokens.torch``, ``species_offsets.pkl``, ``species_chrom.csv`` and the protein-embedding files
    of frog (5 made-up genes, so that human's offset is not 4), human (``genes``) and mouse (``genes``
    capitalised like mouse symbols). Chromosomes go round :data:`UCE_CHROMOSOMES`; starts are random."""
    s = sizes
    if s.d_model % uce.N_HEADS:
        raise ValueError(f"d_model {s.d_model} must be a multiple of UCE's {uce.N_HEADS} heads")
    folder = Path(folder)
    (folder / uce.PROTEIN_DIR).mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    rnd = _normal(g)
    species_genes = {"frog": [f"xgene{i}" for i in range(5)], "human": [str(x) for x in genes],
                     "mouse": [str(x).capitalize() for x in genes]}
    table, offsets, rows = [torch.zeros(1, s.token_dim), torch.randn(3, s.token_dim, generator=g)], {}, []
    for species in sorted(species_genes):
        names = species_genes[species]
        vectors = torch.randn(len(names), s.token_dim, generator=g)
        torch.save({name: vectors[i].clone() for i, name in enumerate(names)}, folder / uce.PROTEIN_DIR /
                   uce.PROTEIN_FILES[species])
        by_symbol = {name.upper(): vectors[i] for i, name in enumerate(names)}  # the original's upper-casing
        offsets[species] = sum(t.shape[0] for t in table)
        table.append(torch.stack(list(by_symbol.values())))
        chroms = UCE_CHROMOSOMES[species]
        rows += [(symbol, chroms[i % len(chroms)], int(rng.integers(1, 10**8)), species)
                 for i, symbol in enumerate(by_symbol)]
    csv = pd.DataFrame(rows, columns=["gene_symbol", "chromosome", "start", "species"])
    csv.to_csv(folder / uce.CHROM_FILE, index=False)
    with open(folder / uce.OFFSETS_FILE, "wb") as f:
        pickle.dump(offsets, f)
    genes_table = torch.cat(table)
    torch.save(genes_table, folder / uce.TOKENS_FILE)
    n_chrom = csv.assign(c=csv["species"] + "_" + csv["chromosome"])["c"].nunique()
    d, t = s.d_model, s.token_dim
    state = OrderedDict({"pos_encoder.pe": uce_position_table(uce.POSITIONS, d), "encoder.0.weight": rnd(d, t),
                         "encoder.0.bias": rnd(d), "encoder.2.weight": 1 + rnd(d), "encoder.2.bias": rnd(d)})
    for i in range(s.n_layers):
        state.update(_post_norm_layer(f"transformer_encoder.layers.{i}.", d, s.d_hid, rnd))
    heads = {"decoder": [(d, s.decoder_hidden), (s.decoder_hidden, s.output_dim), (s.output_dim, s.output_dim)],
             "binary_decoder": [(s.output_dim + d, s.binary_hidden[0]), (s.binary_hidden[0], s.binary_hidden[1]),
                                (s.binary_hidden[1], s.binary_hidden[2])]}
    for head, dims in heads.items():
        for j, (n_in, n_out) in enumerate(dims):
            state.update({f"{head}.{j}.0.weight": rnd(n_out, n_in), f"{head}.{j}.0.bias": rnd(n_out),
                          f"{head}.{j}.1.weight": 1 + rnd(n_out), f"{head}.{j}.1.bias": rnd(n_out)})
    state.update({"decoder.3.weight": rnd(s.output_dim, s.output_dim), "decoder.3.bias": rnd(s.output_dim),
                  "binary_decoder.3.weight": rnd(1, s.binary_hidden[2]), "binary_decoder.3.bias": rnd(1),
                  "gene_embedding_layer.0.weight": rnd(d, t), "gene_embedding_layer.0.bias": rnd(d),
                  "gene_embedding_layer.2.weight": 1 + rnd(d), "gene_embedding_layer.2.bias": rnd(d),
                  "pe_embedding.weight": torch.cat([genes_table, torch.randn(n_chrom, t, generator=g)])})
    torch.save(state, folder / weights)
    return mark_random_release(folder)


# --- scFoundation
SCFOUNDATION_TEST_SIZES = scfoundation.Sizes(16, 2, 2, 8, 2, 1, 4, 10)
SCFOUNDATION_PUBLISHED_SIZES = scfoundation.Sizes(768, 12, 12, 512, 8, 6, 64, 100)  # the released configuration
SCFOUNDATION_ENTRIES = ("gene", "cell", "rde")  # the entries of the released models.ckpt
SCFOUNDATION_PAD_ID, SCFOUNDATION_MASK_ID, SCFOUNDATION_N_CLASS = 103, 102, 104  # as released


def scfoundation_state(sizes: scfoundation.Sizes, n_positions: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """MaeAutobin's full state dict (decoder included) at ``sizes``, random values."""
    d, dd, dh, hd, b = sizes.dim, sizes.decoder_dim, sizes.decoder_dim_head, sizes.decoder_heads, sizes.bin_num
    rnd = _normal(g)
    state = {"token_emb.mlp.weight": rnd(b, 1), "token_emb.mlp.bias": rnd(b), "token_emb.mlp2.weight": rnd(b, b),
             "token_emb.mlp2.bias": rnd(b), "token_emb.emb.weight": rnd(b, d), "token_emb.emb_mask.weight": rnd(1, d),
             "token_emb.emb_pad.weight": rnd(1, d), "pos_emb.weight": rnd(n_positions, d)}
    for i in range(sizes.depth):
        state.update(_post_norm_layer(f"encoder.transformer_encoder.{i}.", d, 4 * d, rnd))
    state.update({"encoder.norm.weight": 1 + rnd(d), "encoder.norm.bias": rnd(d)})
    features = int(dh * math.log(dh))  # the Performer's default number of random features
    for i in range(sizes.decoder_depth):
        p = f"decoder.performer.net.layers.{i}."
        state.update({p + "0.norm.weight": 1 + rnd(dd), p + "0.norm.bias": rnd(dd),
                      p + "0.fn.fast_attention.projection_matrix": rnd(features, dh)})
        for name in ("to_q", "to_k", "to_v"):
            state.update({p + f"0.fn.{name}.weight": rnd(hd * dh, dd), p + f"0.fn.{name}.bias": rnd(hd * dh)})
        state.update({p + "0.fn.to_out.weight": rnd(dd, hd * dh), p + "0.fn.to_out.bias": rnd(dd),
                      p + "1.norm.weight": 1 + rnd(dd), p + "1.norm.bias": rnd(dd),
                      p + "1.fn.fn.w1.weight": rnd(4 * dd, dd), p + "1.fn.fn.w1.bias": rnd(4 * dd),
                      p + "1.fn.fn.w2.weight": rnd(dd, 4 * dd), p + "1.fn.fn.w2.bias": rnd(dd)})
    state.update({"decoder.performer.calls_since_last_redraw": torch.tensor(0), "decoder.norm.weight": 1 + rnd(dd),
                  "decoder.norm.bias": rnd(dd), "decoder_embed.weight": rnd(dd, d), "decoder_embed.bias": rnd(dd),
                  "norm.weight": 1 + rnd(dd), "norm.bias": rnd(dd), "to_final.weight": rnd(1, dd),
                  "to_final.bias": rnd(1)})
    return state


def scfoundation_config(sizes: scfoundation.Sizes, n_genes: int) -> dict:
    """An entry's ``config`` in the released nesting, hyper-parameters at ``sizes``. Which keys sit in
    the model config and which in the dataset config is inferred from the order of the merged dict
    the original prints; the loader merges both, so either placement reads the same."""
    seq_len = n_genes + 2
    arch = scfoundation.ARCHITECTURE
    model = {"mask_gene_name": False, "gene_num": seq_len, "seq_len": seq_len,
             "encoder": {"hidden_dim": sizes.dim, "depth": sizes.depth, "heads": sizes.heads,
                         "dim_head": sizes.dim // sizes.heads, "seq_len": seq_len, "module_type": "transformer",
                         "norm_first": False},
             "decoder": {"hidden_dim": sizes.decoder_dim, "depth": sizes.decoder_depth, "heads": sizes.decoder_heads,
                         "dim_head": sizes.decoder_dim_head, "module_type": "performer", "seq_len": seq_len,
                         "norm_first": False},
             "n_class": SCFOUNDATION_N_CLASS, "pad_token_id": SCFOUNDATION_PAD_ID,
             "mask_token_id": SCFOUNDATION_MASK_ID, "bin_num": sizes.bin_num, "bin_alpha": 1.0, "rawcount": True,
             "model": arch}
    data = {"num_tokens": 13, "bin_type": "auto_bin", "bin_num": sizes.bin_num, "value_mask_prob": 0.3,
            "zero_mask_prob": 0.03, "replace_prob": 0.8, "random_token_prob": 0.1, "mask_ignore_token_ids": [0],
            "decoder_add_zero": True, "mae_encoder_max_seq_len": 15000, "mask_prob": 0.3}
    return {"model": arch, "model_config": {arch: model}, "dataset_config": {"rnaseq": data}}


def write_scfoundation(folder: Path, genes, *, seed: int = 0, sizes: scfoundation.Sizes = SCFOUNDATION_TEST_SIZES,
                       entries: tuple[str, ...] = SCFOUNDATION_ENTRIES) -> Path:
    """``models.ckpt`` and ``OS_scRNA_gene_index.19264.tsv`` in the released layout (nested entries,
    ``model.``-prefixed keys, decoder included), the gene list ``genes`` (so ``seq_len`` = len(genes)
    + 2). ``entries``: which of the released entries to write (one is a third of the file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    genes = list(genes)
    g = torch.Generator().manual_seed(seed)
    released = {}
    for entry in entries:
        state = scfoundation_state(sizes, len(genes) + 3, g)
        released[entry] = {"config": scfoundation_config(sizes, len(genes)),
                           "state_dict": {f"model.{k}": v for k, v in state.items()}}
    torch.save(released, folder / scfoundation.CHECKPOINT)
    (folder / scfoundation.GENE_LIST).write_text(
        "gene_name\tindex\n" + "".join(f"{name}\t{i}\n" for i, name in enumerate(genes)))
    return mark_random_release(folder)


# --- CellPLM
class CellPLMSizes(NamedTuple):
    """OmicsFormer's sizes as its config JSON names them (``batches``: ``batch_num``, ``datasets``:
    ``dataset_num``, the decoder's covariate tables)."""

    enc_hid: int
    enc_layers: int
    latent: int
    dec_hid: int
    clusters: int
    batches: int
    datasets: int


CELLPLM_TEST_SIZES = CellPLMSizes(16, 2, 8, 16, 4, 6, 3)
CELLPLM_PUBLISHED_SIZES = CellPLMSizes(1024, 4, 512, 1024, 16, 12596, 484)  # ckpt/20230926_85M.config.json
CELLPLM_PE_ROWS = 100 * 100  # the 2-d sinusoidal positional table: 100 x 100 positions


def cellplm_state(sizes: CellPLMSizes, n_genes: int, latent_kind: str, g: torch.Generator) -> dict:
    """The pretraining model's full state dict (decoder included) at ``sizes``, random values, in
    the original's key order."""
    d, dl, dh, k = sizes.enc_hid, sizes.latent, sizes.dec_hid, sizes.clusters
    rnd = _normal(g)

    def norm_of(prefix, dim):
        return {prefix + "weight": 1 + rnd(dim), prefix + "bias": rnd(dim)}

    def linear(prefix, n_out, n_in):
        return {prefix + "weight": rnd(n_out, n_in), prefix + "bias": rnd(n_out)}

    state = {**norm_of("embedder.norm0.", d), **linear("embedder.extra_linear.0.", d, d),
             **norm_of("embedder.extra_linear.3.", d), "embedder.pe_enc.missing_pe": rnd(d),
             "embedder.pe_enc.pe_enc.weight": rnd(CELLPLM_PE_ROWS, d), "embedder.feat_enc.emb": rnd(n_genes, d)}
    for i in range(sizes.enc_layers):
        p = f"encoder.layers.{i}."
        for name in ("query", "key", "value", "out"):
            state.update(linear(f"{p}self_attn.{name}_projection.", d, d))
        state.update({**linear(p + "_ff_block.0.", 2 * d, d), **linear(p + "_ff_block.3.", d, 2 * d),
                      **norm_of(p + "norm1.", d), **norm_of(p + "norm2.", d)})
    if latent_kind == "gmvae":
        p = "latent.layers.1.inference."
        hidden = cellplm.QZYX_HIDDEN
        state.update({**linear(p + "inference_qyx.0.logits.", k, d),
                      **linear(p + "inference_qzyx.0.", hidden, d + k),
                      **linear(p + "inference_qzyx.2.mu.", dl, hidden),
                      **linear(p + "inference_qzyx.2.var.", dl, hidden),
                      **linear(p + "y_mu.", dl, k), **linear(p + "y_var.", dl, k)})
    else:
        state.update({**linear("latent.layers.1.hid_2mu.", dl, d), **linear("latent.layers.1.hid_2sigma.", dl, d)})
    state.update({**linear("decoder.layers.0.0.", dh, dl), "decoder.layers.0.1.weight": rnd(1),
                  **norm_of("decoder.layers.0.3.", dh)})
    for name, rows in (("batch", sizes.batches), ("dataset", sizes.datasets)):
        p = f"decoder.covariate_layers.0.{name}."
        state.update({p + "0.weight": rnd(rows, dh), p + "1.weight": rnd(1), **norm_of(p + "2.", dh)})
    state.update({"decoder.out_layer.dec_disp": rnd(n_genes), **linear("decoder.out_layer.dec_1.", 128, dh),
                  **linear("decoder.out_layer.dec_mean.0.", n_genes, 128), **norm_of("pre_latent_norm.norm.", d)})
    return state


def cellplm_config(sizes: CellPLMSizes, gene_list: list[str], latent_kind: str = "gmvae") -> dict:
    """A config JSON with the released one's keys and values, sizes and genes replaced."""
    return {"name": "cellarena_random", "enc_mod": "flowformer", "enc_hid": sizes.enc_hid,
            "enc_layers": sizes.enc_layers, "latent_mod": latent_kind, "lamda": 5.0,
            "post_latent_dim": sizes.latent, "dec_mod": "nbmlp", "dec_hid": sizes.dec_hid, "dec_layers": 2,
            "model_dropout": 0.2, "mask_node_rate": 0.75, "mask_feature_rate": 0.25, "drop_node_rate": 0.3,
            "norm": "groupnorm", "dataset": "HLCA", "architecture": "OmicsFormer", "epochs": 200, "lr": 0.0002,
            "wd": 1e-08, "w_li": 5.0, "w_en": 5.0, "num_clusters": sizes.clusters, "out_dim": len(gene_list),
            "ddp": True, "cat_pe": False, "val_num": 10, "max_batch_size": 4000, "dar": False,
            "input_covariate": False, "beta": [2.0, 1.5], "batch_mixing": False, "ecs": False, "dsbn": False,
            "dae": True, "batch_flip": True, "mask_beta": True, "batch_num": sizes.batches,
            "dataset_num": sizes.datasets, "gene_list": gene_list}


def write_cellplm(folder: Path, genes, *, seed: int = 0, sizes: CellPLMSizes = CELLPLM_TEST_SIZES,
                  latent_kind: str = "gmvae", prefix: str = cellplm.PREFIX) -> Path:
    """``<prefix>.best.ckpt`` (``{"model_state_dict": ...}``, the pretraining model's keys with the
    decoder), ``<prefix>.config.json`` and the symbol table. The gene list is made-up Ensembl ids,
    one per symbol of ``genes``, which the table maps."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    genes = [str(x) for x in genes]
    ids = _made_up_ensembl_ids(len(genes))
    g = torch.Generator().manual_seed(seed)
    ckpt_name, config_name, symbols_name = cellplm.release_files(prefix)
    state = cellplm_state(sizes, len(ids), latent_kind, g)
    torch.save({"model_state_dict": state}, folder / ckpt_name)
    (folder / config_name).write_text(json.dumps(cellplm_config(sizes, ids, latent_kind)))
    rows = "".join(f"{e}\t{s}\n" for e, s in zip(ids, genes, strict=True))
    (folder / symbols_name).write_text("ensembl_id\tsymbol\n" + rows)
    return mark_random_release(folder)


# each adapter family's plug-in class -> (writer, test sizes, published sizes)
_WRITERS = {scgpt.Plugin: (write_scgpt, SCGPT_TEST_SIZES, SCGPT_PUBLISHED_SIZES),
            geneformer.Plugin: (write_geneformer, GENEFORMER_TEST_SIZES, GENEFORMER_PUBLISHED_SIZES),
            uce.Plugin: (write_uce, UCE_TEST_SIZES, UCE_PUBLISHED_SIZES),
            scfoundation.Plugin: (write_scfoundation, SCFOUNDATION_TEST_SIZES, SCFOUNDATION_PUBLISHED_SIZES),
            cellplm.Plugin: (write_cellplm, CELLPLM_TEST_SIZES, CELLPLM_PUBLISHED_SIZES)}


def write_release(plugin_cls: type, card, root: str | Path, genes, seed: int = 0, *,
                  published_sizes: bool = False) -> Path | None:
    """A random release for the plug-in class ``plugin_cls`` (a model folder's ``Model``) in the folder
    its ``card`` names under ``root``, written by the writer of the adapter family it derives from,
    with the variant the plug-in or the card selects (Geneformer's ``version``, UCE's weights file).
    ``published_sizes``: the released architecture instead of the test sizes; scFoundation then writes
    only the entry the card reads. Returns the release folder; None when no writer serves ``plugin_cls``."""
    family = next((c for c in plugin_cls.__mro__ if c in _WRITERS), None)
    if family is None:
        return None
    writer, test_sizes, published = _WRITERS[family]
    options = {}
    if family is geneformer.Plugin:
        options["version"] = plugin_cls.version
    elif family is uce.Plugin:
        options["weights"] = uce.weights_file(card)
    elif family is scfoundation.Plugin and published_sizes:
        options["entries"] = (scfoundation.VERSIONS[str(card.params["version"])],)
    return writer(Path(root) / card.checkpoint.folder, list(genes), seed=seed,
                  sizes=published if published_sizes else test_sizes, **options)
