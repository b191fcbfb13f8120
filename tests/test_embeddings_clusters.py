"""Embedding geometry equals a direct float64 computation; clusters are seeded and decoded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import checkpoints
import layerscope
from layerscope.cli import main
from layerscope.weights import cosine_kernel
from layerscope.weights.embeddings import GeometryOptions, cosine_geometry
from layerscope.sources import open_source
from conftest import require

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
    if use_numba:  # the numba case must run the numba kernel, not silently fall back to torch
        require("numba")
        assert cosine_kernel.HAVE_NUMBA
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


def test_sample_interval_covers_the_exact_mean_as_stated(minilm_embedding):
    """The stated 95% interval, checked as a statistic: over 12 seeds it must cover the exact mean at
    least 10 times (a valid 95% interval fails this with probability 2%, binomial), and no estimate
    may be off by more than 1.5 half-widths (z > 2.94: probability 0.3% each)."""
    x = minilm_embedding[:SUBSET]
    exact = cosine_geometry(x, GeometryOptions(precision="float64", max_memory=64 << 20))["mean"]
    covered = 0
    for seed in range(12):
        est = cosine_geometry(x, GeometryOptions(sample=20_000, seed=seed))
        lo, hi = est["mean_ci95"]
        half = (hi - lo) / 2
        assert est["method"] == "sample"
        assert half == pytest.approx(1.96 * est["std"] / 20_000 ** 0.5, rel=1e-12)
        assert abs(est["mean"] - exact) < 1.5 * half, seed
        covered += lo <= exact <= hi
    assert covered >= 10


def test_percentiles_isotropy_norms_and_hubs_equal_numpy(minilm_embedding):
    x = minilm_embedding[:SUBSET]
    opts = GeometryOptions(precision="float64", max_memory=4 << 20, threshold=0.5, top_hubs=10)
    got = cosine_geometry(x, opts)
    xd = x.double().numpy()
    norms = np.linalg.norm(xd, axis=1)
    xn = xd / norms[:, None]
    c = (xn @ xn.T)[np.triu_indices(len(xn), 1)]
    for key, value in got["percentiles"].items():  # linear inside the bin: within one bin width
        assert abs(value - np.percentile(c, float(key[1:]))) <= got["percentile_error"], key
    assert got["isotropy"]["mean_vector_norm_over_mean_norm"] == pytest.approx(
        np.linalg.norm(xd.mean(axis=0)) / norms.mean(), rel=1e-12)
    assert got["norms"]["mean"] == pytest.approx(norms.mean(), rel=1e-12)
    assert got["norms"]["std"] == pytest.approx(norms.std(), rel=1e-10)
    assert (got["norms"]["min"], got["norms"]["max"]) == pytest.approx((norms.min(), norms.max()), rel=1e-12)
    assert got["norms"]["p50"] == pytest.approx(np.median(norms), rel=1e-12)
    full = xn @ xn.T
    np.fill_diagonal(full, -np.inf)
    neighbours = (full > opts.threshold).sum(axis=1)
    hubs = got["threshold"]["top_hubs"]
    assert [h["neighbors"] for h in hubs] == sorted(neighbours, reverse=True)[:len(hubs)] and len(hubs) == 10
    assert all(neighbours[h["id"]] == h["neighbors"] for h in hubs)


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
    # MiniLM's vocabulary has no cluster structure by the stated rule (silhouette ~0.05 < 0.25)
    assert a["verdict"]["structure"] is False and a["verdict"]["best_silhouette"] < 0.25


def test_elbow_is_claimed_only_at_a_real_bend():
    from layerscope.weights.clusters import elbow, elbow_ratio, verdict

    ks = [2, 4, 8, 16, 32, 64]
    straight = [100 - 10 * np.log2(k) for k in ks]  # a straight line against log k: no elbow
    bent = [100, 60, 20, 18, 16, 14]  # falls 40 per doubling, then 2
    assert elbow_ratio(ks, bent, elbow(ks, bent)) == pytest.approx(40 / 2)
    for inertia, claimed in ((straight, False), (bent, True)):
        scores = [{"k": k, "silhouette": 0.1, "inertia": i} for k, i in zip(ks, inertia)]
        v = verdict({"scores": scores, "elbow_k": elbow(ks, inertia)})
        assert v["elbow_claimed"] is claimed and v["structure"] is False


def test_untrained_rows_of_minilm(minilm_embedding):
    from layerscope.weights.embeddings import Vocabulary
    from layerscope.weights.untrained import untrained_rows

    src = open_source(checkpoints.minilm_dir())
    vocab = Vocabulary.of(src, layerscope.inspect(checkpoints.minilm_dir()))
    u = untrained_rows(minilm_embedding, vocab)
    unused = [i for i in range(30522) if vocab.tokenizer.id_to_token(i).startswith("[unused")]
    assert u.by_name == len(unused) == 994 and set(unused) <= set(u.ids.tolist())
    # the extension by similarity: rows within 4 sd of the [unused] rows' mean cosine to their centroid
    x = minilm_embedding.double().numpy()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    centre = unit[unused].mean(axis=0)
    cos = unit @ (centre / np.linalg.norm(centre))
    norms = np.linalg.norm(x, axis=1)
    band = cos[unused].mean() - 4 * cos[unused].std()
    expected = (cos >= band) & (norms >= norms[unused].min()) & (norms <= norms[unused].max())
    assert set(np.nonzero(expected)[0]) | set(unused) == set(u.ids.tolist())
    for word in ("the", "king", "queen", "##ing"):
        assert vocab.lookup(word) not in u
    assert vocab.lookup("พ") in u  # MiniLM's top hub, a rare-script character


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


def test_unreadable_tokenizer_is_a_warning_and_a_note(tmp_path, caplog):
    """A tokenizer.json that does not parse: tokens fall back to #id, with one warning line and a note."""
    import logging

    path = checkpoints.build_hf("llama", tmp_path / "llama")
    (path / "tokenizer.json").write_text("{ this is not a tokenizer")
    with caplog.at_level(logging.WARNING, logger="layerscope"):
        result = layerscope.embeddings(path, store=str(tmp_path / "s.sqlite"))
    warnings = [r.getMessage() for r in caplog.records if "tokenizer.json" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "#id" in warnings[0]
    g = result.matrices["embed.token"]
    assert g["notes"] and "cannot read tokenizer.json" in g["notes"][0]
    assert all(h["text"].startswith("#") for h in g["threshold"]["top_hubs"])
    caplog.clear()
    clusters = layerscope.clusters(path, k_values=[2, 3], store=str(tmp_path / "s.sqlite"))
    assert "cannot read tokenizer.json" in clusters.matrices["embed.token"]["notes"][0]
    # a readable tokenizer gives no note
    assert "notes" not in layerscope.embeddings(checkpoints.minilm_dir(), store=str(tmp_path / "m.sqlite"),
                                                options=GeometryOptions(sample=20000)).matrices["embed.token"]


# -- above FIT_SAMPLE rows: k chosen on a row sample, one full-vocabulary fit ---------------------
def _planted(k: int, n_per: int, dim: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, k)))[0].T  # k orthonormal directions
    truth = rng.permutation(np.repeat(np.arange(k), n_per))
    x = centres[truth] + noise * rng.standard_normal((k * n_per, dim))
    return torch.from_numpy(x).float(), truth


def test_calinski_harabasz_equals_sklearn():
    """The index from float64 cluster sums equals scikit-learn's loop over clusters."""
    from sklearn.metrics import calinski_harabasz_score

    from layerscope.weights.clusters import calinski_harabasz

    x, truth = _planted(5, 80, 12, 0.3)
    x64 = x.double().numpy()
    rng = np.random.default_rng(1)
    for labels in (truth, rng.integers(0, 7, len(x64)), np.where(truth == 0, 9, truth)):  # 9: gaps in label ids
        assert calinski_harabasz(x64, labels) == pytest.approx(calinski_harabasz_score(x64, labels), rel=1e-10)


@pytest.mark.parametrize("dim", [16, 600])  # 600 > PCA_ABOVE: the sample fits run on 512 principal components
def test_sampled_fit_finds_planted_groups_and_noise_has_none(dim):
    """With more rows than the fit sample, k chosen on the sample and the one full fit recover planted
    groups exactly; a Gaussian matrix of the same shape through the same procedure shows no structure
    by the stated rule (best silhouette below SILHOUETTE_MIN)."""
    from sklearn.metrics import adjusted_rand_score

    from layerscope.weights.clusters import REFINE_MAX_ITER, SILHOUETTE_MIN, cluster_rows, verdict

    x, truth = _planted(7, 300, dim, 0.6 / dim ** 0.5)
    ks = [2, 3, 5, 7, 10, 14]
    r = cluster_rows(x, ks, seed=0, fit_sample=600, silhouette_sample=400, with_labels=True)
    assert r["fit"]["sampled"] and r["fit"]["sample_rows"] == 600 and r["fit"]["rows"] == 2100
    assert r["fit"]["pca_components"] == (512 if dim > 512 else None)
    assert 1 <= r["fit"]["refine_iterations"] <= REFINE_MAX_ITER
    assert r["chosen_k"] == 7 and adjusted_rand_score(truth, r["labels"]) == 1.0
    assert sorted(c["size"] for c in r["clusters"]) == [300] * 7
    assert verdict(r)["structure"]
    noise = torch.from_numpy(np.random.default_rng(2).standard_normal(tuple(x.shape))).float()
    v = verdict(cluster_rows(noise, ks, seed=0, fit_sample=600, silhouette_sample=400))
    assert not v["structure"] and v["best_silhouette"] < SILHOUETTE_MIN  # 0.10 at 16 dimensions, 0.005 at 600


def test_sampled_fit_agrees_with_fitting_every_k_on_every_row():
    """Above MINIBATCH_ABOVE rows (MiniBatchKMeans): the sampled procedure's choice and labels equal those
    of the previous procedure, every k fitted on every row (computed here), on planted groups; and its
    CH and inertia columns are the sample fit's nearest-centroid labels scored on every row."""
    from sklearn.metrics import adjusted_rand_score, calinski_harabasz_score, silhouette_score
    from threadpoolctl import threadpool_limits

    from layerscope.weights.clusters import MINIBATCH_ABOVE, _kmeans, cluster_rows

    x, truth = _planted(6, 3600, 16, 0.15)
    assert len(x) > MINIBATCH_ABOVE
    ks = [3, 6, 9]
    new = cluster_rows(x, ks, seed=0, with_labels=True)
    xn = torch.nn.functional.normalize(x.double(), dim=1).float().numpy()
    sil_rows = np.random.RandomState(0).permutation(len(xn))[:5000]
    with threadpool_limits(1):  # as cluster_rows (the default threads only make it slower on a busy CPU)
        old = {k: _kmeans(k, len(xn), 0).fit(xn).labels_ for k in ks}
    old_sil = {k: silhouette_score(xn[sil_rows], old[k][sil_rows], metric="cosine") for k in ks}
    assert new["chosen_k"] == max(old_sil, key=old_sil.get) == 6
    assert adjusted_rand_score(old[6], new["labels"]) == 1.0 == adjusted_rand_score(truth, new["labels"])
    row = {s["k"]: s for s in new["scores"]}[6]  # at the planted k the sample fit already labels every row right
    assert row["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(xn, truth), rel=1e-5)
    means = np.stack([xn[truth == c].mean(axis=0) for c in range(6)])  # the best centres for these labels
    best = ((xn - means[truth]) ** 2).sum()
    assert best * (1 - 1e-6) <= row["inertia"] <= best * 1.01  # every row's, to the sample's centroids


@pytest.mark.parametrize("rows,cols", [(400, 120), (120, 400)])  # the d × d Gram, and the m × m one when wider
def test_pca_basis_spans_the_top_singular_vectors(rows, cols):
    from layerscope.weights.clusters import _pca_basis

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, 12)) @ rng.standard_normal((12, cols)) * np.linspace(3, 1, 12)[:1]
         + 0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
    mean, basis = _pca_basis(x, 10)
    c = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    top = np.linalg.svd(c, full_matrices=False)[2][:10].T  # float64 reference
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(basis.T @ basis, np.eye(10), atol=1e-5)
    assert np.linalg.svd(top.T @ basis, compute_uv=False).min() > 1 - 1e-5  # the same subspace
    if cols <= rows:  # as many components as columns: no reduction
        assert _pca_basis(x, cols) is None
    else:  # more components asked than the centred rows span: the rows - 1 they do, orthonormal
        basis = _pca_basis(x, cols)[1]
        assert basis.shape == (cols, rows - 1) and np.isfinite(basis).all()
        np.testing.assert_allclose(basis.T @ basis, np.eye(rows - 1), atol=1e-4)
