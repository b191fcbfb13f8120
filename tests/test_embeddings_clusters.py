"""Embedding geometry equals a direct float64 computation; clusters are seeded and decoded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import checkpoints
import layerscope
from layerscope.cli import main
from layerscope.weights.embeddings import GeometryOptions, cosine_geometry
from layerscope.sources import open_source

SUBSET = 2500


@pytest.fixture(scope="module")
def minilm_embedding():
    return open_source(checkpoints.minilm_dir()).load("embeddings.word_embeddings.weight")


def direct(x: torch.Tensor, opts: GeometryOptions):
    """Everything from the full V × V float64 matrix, with the same bin formula."""
    xn = x.double().numpy()
    xn = xn / np.linalg.norm(xn, axis=1, keepdims=True)
    c_full = xn @ xn.T
    iu = np.triu_indices(len(xn), 1)
    c = c_full[iu]
    inside = c[(c >= opts.lo) & (c <= opts.hi)]
    k = np.minimum(np.floor((inside - opts.lo) * (opts.bins / (opts.hi - opts.lo))).astype(int), opts.bins - 1)
    np.fill_diagonal(c_full, -np.inf)
    return {"mean": c.mean(), "std": c.std(), "counts": np.bincount(k, minlength=opts.bins),
            "below": int((c < opts.lo).sum()), "above": int((c > opts.hi).sum()),
            "neighbours": (c_full > opts.threshold).sum(axis=1)}


@pytest.mark.parametrize("use_numba", [True, False])
def test_streamed_geometry_equals_direct_float64(minilm_embedding, use_numba):
    x = minilm_embedding[:SUBSET]
    opts = GeometryOptions(precision="float64", max_memory=4 << 20)  # forces many blocks
    got = cosine_geometry(x, opts, use_numba=use_numba)
    ref = direct(x, opts)
    assert got["block_rows"] < SUBSET // 4
    assert got["pairs"] == SUBSET * (SUBSET - 1) // 2
    assert got["mean"] == pytest.approx(ref["mean"], rel=1e-12)
    assert got["std"] == pytest.approx(ref["std"], rel=1e-10)
    assert got["histogram"]["counts"] == ref["counts"].tolist()
    assert (got["histogram"]["below"], got["histogram"]["above"]) == (ref["below"], ref["above"])
    np.testing.assert_array_equal(got["neighbor_counts"], ref["neighbours"])


def test_float32_geometry_agrees_within_edge_rounding(minilm_embedding):
    x = minilm_embedding[:SUBSET]
    opts = GeometryOptions(max_memory=4 << 20)
    got, ref = cosine_geometry(x, opts), direct(x, opts)
    assert got["mean"] == pytest.approx(ref["mean"], rel=1e-6)
    moved = np.abs(np.array(got["histogram"]["counts"]) - ref["counts"]).sum()
    # only pairs within float32 rounding of a bin edge may change bins (each move changes two counts)
    xn = x.double().numpy()
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    c = (xn @ xn.T)[np.triu_indices(len(xn), 1)]
    pos = (c - opts.lo) * (opts.bins / (opts.hi - opts.lo))
    near_edge = int((np.abs(pos - np.round(pos)) < 5e-6 * opts.bins / (opts.hi - opts.lo)).sum())
    assert 0 < moved <= 2 * near_edge or moved == 0


def test_full_vocabulary_is_deterministic_and_bounded(minilm_embedding):
    opts = GeometryOptions(max_memory=256 << 20)
    a = cosine_geometry(minilm_embedding, opts)
    b = cosine_geometry(minilm_embedding, opts)
    assert a["pairs"] == 30522 * 30521 // 2 == sum(a["histogram"]["counts"]) + a["histogram"]["below"] + a["histogram"]["above"]
    assert a["histogram"]["counts"] == b["histogram"]["counts"] and a["mean"] == b["mean"]
    assert a["block_rows"] * 30522 * 5 <= 256 << 20  # block of float32 cosines (+ mask) within budget
    p = a["percentiles"]
    assert p["p1"] < p["p50"] < p["p99"]


def test_sample_estimate_brackets_the_exact_mean(minilm_embedding):
    exact = cosine_geometry(minilm_embedding[:4000], GeometryOptions())["mean"]
    est = cosine_geometry(minilm_embedding[:4000], GeometryOptions(sample=200_000, seed=1))
    lo, hi = est["mean_ci95"]
    assert est["method"] == "sample" and lo - 0.002 < exact < hi + 0.002


def test_cli_embeddings_minilm(tmp_path, capsys):
    out = tmp_path / "emb.json"
    code = main(["embeddings", str(checkpoints.minilm_dir()), "--tokens", "the,king", "--out", str(out),
                 "--plot", str(tmp_path / "plots"), "--max-memory", "256MB"])
    text = capsys.readouterr().out
    assert code == 0 and "nearest to 'king'" in text
    data = json.loads(out.read_text())["matrices"]["embed.token"]
    assert data["vocab_size"] == 30522 and len(data["histogram"]["counts"]) == 100
    assert any(n["text"] == "queen" for n in data["nearest"]["king"])
    assert (tmp_path / "plots" / "cosine_histogram_embed_token.png").stat().st_size > 10_000


def test_unknown_token_is_one_line(capsys):
    code = main(["embeddings", str(checkpoints.minilm_dir()), "--tokens", "xqzjvwkpl", "--sample", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "xqzjvwkpl" in err


def test_untied_lm_head_is_analysed_separately(tmp_path):
    path = checkpoints.build_hf("llama", tmp_path / "llama")
    result = layerscope.embeddings(path)
    assert set(result.matrices) == {"embed.token", "lm_head"}
    tied = layerscope.embeddings(checkpoints.build_hf("gpt2", tmp_path / "gpt2"))
    assert set(tied.matrices) == {"embed.token"}


def test_model_without_embeddings_is_one_line(tmp_path, capsys):
    path = checkpoints.save_safetensors({"model.layers.0.mlp.down_proj.weight": torch.randn(8, 8)}, tmp_path / "x.safetensors")
    for command in ("embeddings", "clusters"):
        code = main([command, str(path)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "embed" in err


def test_clusters_are_seeded_and_decoded(tmp_path):
    kwargs = dict(k_values=[2, 4, 8], store=str(tmp_path / "s.sqlite"), cache=False)
    a = layerscope.clusters(checkpoints.minilm_dir(), **kwargs).matrices["embed.token"]
    b = layerscope.clusters(checkpoints.minilm_dir(), **kwargs).matrices["embed.token"]
    assert a["chosen_k"] == b["chosen_k"] and a["clusters"] == b["clusters"]
    assert [s["k"] for s in a["scores"]] == [2, 4, 8]
    assert sum(c["size"] for c in a["clusters"]) == 30522
    assert all(isinstance(t, str) and t for c in a["clusters"] for t in c["text"])
    best = max(a["scores"], key=lambda s: s["silhouette"])["k"]  # the default selection
    assert a["chosen_k"] == best


def test_cli_clusters_positions_separately(tmp_path, capsys):
    out = tmp_path / "c.json"
    code = main(["clusters", str(checkpoints.minilm_dir()), "--matrix", "embed.position", "--k-values", "2,3,4",
                 "--out", str(out), "--plot", str(tmp_path / "p")])
    assert code == 0
    data = json.loads(out.read_text())["matrices"]
    assert list(data) == ["embed.position"] and data["embed.position"]["rows"] == 512
    assert data["embed.position"]["clusters"][0]["text"][0].startswith("position ")


def test_clusters_equal_the_per_k_silhouette_path():
    """The silhouette distances computed once give the choice and labels of the previous path, which
    recomputed them for every k through sklearn (same seeded rows)."""
    from sklearn.metrics import silhouette_score

    from layerscope.weights.clusters import _kmeans, cluster_rows

    x = open_source(checkpoints.minilm_dir()).load("embeddings.word_embeddings.weight")[:3000]
    ks = [2, 4, 8, 16]
    got = cluster_rows(x, ks, seed=0, silhouette_sample=1000, with_labels=True)
    xn = torch.nn.functional.normalize(x.double(), dim=1).float().numpy()
    sils = []
    for k in ks:
        labels = _kmeans(k, len(xn), 0).fit(xn).labels_
        sils.append(silhouette_score(xn, labels, metric="cosine", sample_size=1000, random_state=0))
    assert [s["silhouette"] for s in got["scores"]] == pytest.approx(sils, rel=1e-5)
    assert got["chosen_k"] == ks[int(np.argmax(sils))]
    np.testing.assert_array_equal(got["labels"], _kmeans(got["chosen_k"], len(xn), 0).fit(xn).labels_)
