"""README claims about reading, caching and selection that no other test pinned down (issue 17).

Reads are counted with a spy on the source's own ``load`` (the real method is called through), store
writes with spies on the store's own ``put*`` methods; nothing under test is replaced.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import layerscope
from layerscope.sources import open_source


class LoadLog:
    """Wraps ``source.load``: every call is logged, and a weak reference to each returned tensor tells
    how many earlier tensors were still alive when the next one was read."""

    def __init__(self, source):
        self.names: list[str] = []
        self.alive_at_load: list[int] = []
        self._refs: list[weakref.ref] = []
        original = source.load

        def load(name):
            self.alive_at_load.append(sum(r() is not None for r in self._refs))
            tensor = original(name)
            self.names.append(name)
            self._refs.append(weakref.ref(tensor))
            return tensor

        source.load = load


def _counting(monkeypatch, cls, methods: tuple[str, ...]) -> dict[str, int]:
    calls = {m: 0 for m in methods}
    for m in methods:
        original = getattr(cls, m)

        def spy(self, *args, _m=m, _original=original, **kwargs):
            calls[_m] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, m, spy)
    return calls


# -- "File fingerprints (path, size, mtime) let a re-run skip even reading unchanged tensors" -------
def test_rerun_reads_no_tensor(tmp_path):
    path = checkpoints.build_hf("llama", tmp_path / "llama", fmt="sharded")
    store = str(tmp_path / "s.sqlite")
    first = open_source(path)
    log1 = LoadLog(first)
    layerscope.analyze(first, store=store)
    assert sorted(log1.names) == sorted(first.names())  # positive control: each tensor read exactly once
    second = open_source(path)
    log2 = LoadLog(second)
    result = layerscope.analyze(second, store=store)
    assert log2.names == [] and result.computed == 0
    # a changed file (new mtime/size) is read again: the fingerprint really guards the skip
    shard = sorted(Path(path).glob("model-*.safetensors"))[0]
    shard.touch()
    third = open_source(path)
    log3 = LoadLog(third)
    layerscope.analyze(third, store=store)
    assert log3.names and all(third._where[n][0] == shard for n in log3.names)


# -- "Drift of each pair of tensors is stored under the two content hashes, so comparing again reads nothing"
def test_comparing_again_reads_nothing(tmp_path):
    a = checkpoints.build_hf("gpt2", tmp_path / "a", seed=1)
    b = checkpoints.build_hf("gpt2", tmp_path / "b", seed=2)
    store = str(tmp_path / "s.sqlite")
    first = layerscope.compare(a, b, store=store)
    sa, sb = open_source(a), open_source(b)
    la, lb = LoadLog(sa), LoadLog(sb)
    again = layerscope.compare(sa, sb, store=store)
    assert la.names == [] and lb.names == []
    cols = ["name", "rel_change", "cosine", "procrustes_cosine"]
    assert again.table[cols].equals(first.table[cols])


# -- "at most `workers` tensors in memory at once"; "bf16/fp16 tensors are upcast one at a time" ----
@pytest.mark.parametrize("workers", [1, 2])
def test_tensors_are_read_and_released_one_at_a_time(tmp_path, workers):
    path = checkpoints.build_hf("llama", tmp_path / "llama", dtype=torch.bfloat16)
    source = open_source(path)
    log = LoadLog(source)
    layerscope.analyze(source, store=str(tmp_path / "s.sqlite"), workers=workers)
    assert sorted(log.names) == sorted(source.names())
    # when a tensor is read, at most workers − 1 earlier ones are still held (the others' work is in flight)
    assert max(log.alive_at_load) <= workers - 1, log.alive_at_load
    if workers == 1:  # "largest first": the read order is by size, descending
        sizes = [source.infos[n].numel for n in log.names]
        assert sizes == sorted(sizes, reverse=True)


# -- "safetensors are read with readinto, not memory-mapped" -------------------------------------
def test_safetensors_are_not_memory_mapped(tmp_path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    path = checkpoints.save_safetensors({f"w{i}": torch.randn(64, 64) for i in range(4)},
                                        tmp_path / "only-here.safetensors")
    source = open_source(path)
    held = [source.load(n) for n in source.names()]
    assert str(path) not in maps.read_text()  # a mapped file would be listed while its tensors live
    assert all(t.untyped_storage().nbytes() == 64 * 64 * 4 for t in held)  # one buffer per tensor, owned
    from safetensors import safe_open  # positive control: safetensors' own reader does map the file

    with safe_open(str(path), "pt") as f:
        mapped = f.get_tensor("w0")
        assert str(path) in maps.read_text()
        del mapped


# -- "every matrix of a checkpoint — 150k-row embeddings included" --------------------------------
def test_150k_row_embedding_is_analysed_whole(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(150_000, 8, generator=g) * torch.linspace(0.5, 3.0, 8)
    emb[149_999] *= 40  # the last row dominates σ_max: a reader that dropped rows would miss it
    path = checkpoints.save_safetensors({"model.embed_tokens.weight": emb}, tmp_path / "e.safetensors")
    row = layerscope.analyze(path, store=str(tmp_path / "s.sqlite")).table.set_index("name").loc["model.embed_tokens.weight"]
    s = np.linalg.svd(emb.double().numpy(), compute_uv=False)
    assert row["shape"] == "150000×8" and row["numel"] == 1_200_000
    assert row["spectral_norm"] == pytest.approx(s[0], rel=1e-9)
    assert row["frobenius_norm"] == pytest.approx(np.sqrt((s**2).sum()), rel=1e-9)
    assert row["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    assert row["condition_number"] == pytest.approx(s[0] / s[-1], rel=1e-6)


# -- clusters: "--select-by calinski_harabasz|elbow" choose k by their own criterion ---------------
def _blobs(k: int, n_per: int = 120, dim: int = 16, noise: float = 0.08, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, k)))[0].T  # k orthonormal directions
    x = np.concatenate([c + noise * rng.standard_normal((n_per, dim)) for c in centres])
    return torch.from_numpy(x).float()


@pytest.mark.parametrize("true_k", [4, 7])
def test_each_selection_rule_finds_the_planted_cluster_count(true_k):
    from sklearn.metrics import calinski_harabasz_score

    from layerscope.weights.clusters import cluster_rows, elbow_ratio

    x = _blobs(true_k)
    ks = [2, 3, 4, 5, 6, 7, 8, 10]
    for selection in ("silhouette", "calinski_harabasz", "elbow"):
        r = cluster_rows(x, ks, seed=0, selection=selection)
        assert r["selection"] == selection and r["chosen_k"] == true_k, (selection, r["chosen_k"])
    scores = {s["k"]: s for s in r["scores"]}
    # the CH column is sklearn's index of the labels k-means gave (a wrong column would pick another k)
    xn = torch.nn.functional.normalize(x, dim=1).numpy()
    assert max(scores, key=lambda k: scores[k]["calinski_harabasz"]) == true_k
    assert elbow_ratio(ks, [scores[k]["inertia"] for k in ks], true_k) >= 2
    sizes = sorted(c["size"] for c in r["clusters"])
    assert sizes == [120] * true_k  # the planted groups, exactly
    assert calinski_harabasz_score(xn, np.repeat(np.arange(true_k), 120)) == pytest.approx(
        scores[true_k]["calinski_harabasz"], rel=1e-6)


# -- "Every stage reads and writes the store, so ... a second run only re-renders" ---------------
def test_second_run_only_rerenders(tmp_path, monkeypatch):
    from layerscope import Config
    from layerscope.run import run
    from layerscope.store import Store

    path = checkpoints.build_nanogpt(tmp_path / "ckpt.pt")
    config = Config(store=str(tmp_path / "s.sqlite"))
    skip = {"probe", "activations"}  # minutes on this CPU; their own re-runs are tested in test_probes_*
    first = run(path, config, out=tmp_path / "one", quiet=True, skip=skip)
    with Store(config.resolved_store()) as store:
        before = store.counts()
    writes = _counting(monkeypatch, Store, ("put", "put_artifact", "put_arrays", "remember_hash"))
    second = run(path, config, out=tmp_path / "two", quiet=True, skip=skip)
    assert writes == {"put": 0, "put_artifact": 0, "put_arrays": 0, "remember_hash": 0}, writes
    with Store(config.resolved_store()) as store:
        assert store.counts() == before
    assert second.models[0].analysis.computed == 0
    assert set(second.stage_seconds) == set(first.stage_seconds)  # every stage ran, from the store
    for name in ("analysis.csv", "heads.csv", "embeddings.json", "clusters.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
