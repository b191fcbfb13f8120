"""Pruning masks and curves, and merging (Fisher-weighted, average, TIES) against direct computations,
on the GPT trained by examples/train_gpt.py and a tiny trained Llama with a real fine-tune of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import checkpoints
from layerscope.cli import main
from layerscope.probes import Objective, load_data, load_model
from layerscope.probes.data import default_text
from layerscope.probes.fisher import FisherOptions, fisher_diagonal
from layerscope.probes.merge import average, fisher_merge, ties_merge
from layerscope.probes.prune import mask_iou, prunable, pruning_probe, Zeroed, split_mask
from test_probes_base import trained_llama  # noqa: F401  (module-scoped fixture)


def test_pruning_zeroes_exactly_the_share_and_the_curve_is_the_held_out_loss(trained_run):
    model = load_model(trained_run["checkpoints"][-1])
    data = load_data(model, None, seq_len=32, batches=3, batch_size=4, seed=6)
    calibration, held = data.split(1)
    cal, ho = Objective(model, calibration), Objective(model, held)
    fisher = fisher_diagonal(cal).values
    before = {n: p.detach().clone() for n, p in model.params.items()}
    result = pruning_probe(cal, ho, fisher, [0.1, 0.5])
    names = prunable(model)
    assert all(model.role(n).startswith(("attn.", "mlp.")) for n in names)
    total = sum(model.params[n].numel() for n in names)
    assert result.prunable == total
    weights = torch.cat([before[n].reshape(-1) for n in names]).double()
    for method, masks in result.masks.items():
        for s, mask in masks.items():
            assert int(mask.sum()) == round(s * total)  # exactly that share
            with Zeroed(model, split_mask(mask, model, names)):
                zeros = sum(int((model.params[n] == 0).sum()) for n in names)
                assert zeros == round(s * total)
                loss = ho.evaluate().loss
            row = result.curves[(result.curves["method"] == method) & (result.curves["sparsity"] == s)].iloc[0]
            assert row["loss"] == pytest.approx(loss, rel=1e-9)
            if method == "magnitude":  # the pruned set is exactly the smallest |w| (float64 NumPy reference)
                ref = np.argsort(np.abs(weights.numpy()), kind="stable")[: round(s * total)]
                assert set(ref.tolist()) == set(torch.nonzero(mask).reshape(-1).tolist())
            if method == "fisher":
                f = torch.cat([fisher[n].reshape(-1).double() for n in names]).numpy()
                score = f * weights.numpy() ** 2
                kept = np.ones(total, dtype=bool)
                kept[mask.numpy()] = False
                assert score[mask.numpy()].max() <= score[kept].min()
    for n, p in model.params.items():  # restored
        torch.testing.assert_close(p.detach(), before[n], atol=0, rtol=0)
    baseline = ho.evaluate().loss
    assert result.baseline == pytest.approx(baseline, rel=1e-12)
    assert set(result.curves["method"]) == {"magnitude", "fisher", "taylor"}
    assert len(result.iou) == 2 * 3 and result.iou["iou"].between(0, 1).all()
    m = result.masks["fisher"][0.1]
    assert mask_iou(m, m) == 1.0 and mask_iou(m, ~m) == 0.0
    # the pruning evaluations are stored: the second run reads them
    from layerscope.store import Store

    with Store(trained_run["dir"] / "prune.sqlite") as store:
        first = pruning_probe(cal, ho, fisher, [0.3], methods=("magnitude",), store=store)
        again = pruning_probe(cal, ho, fisher, [0.3], methods=("magnitude",), store=store)
        assert store.counts()["artifacts"] == 2
    assert again.curves["loss"].tolist() == first.curves["loss"].tolist()


def test_merges_against_direct_computation():
    gen = torch.Generator().manual_seed(0)
    shape = (7, 5)
    states = [{"a": torch.randn(shape, generator=gen, dtype=torch.float64), "b": torch.randn(3, generator=gen, dtype=torch.float64)}
              for _ in range(3)]
    fishers = [{"a": torch.rand(shape, generator=gen, dtype=torch.float64) ** 3, "b": torch.zeros(3, dtype=torch.float64)}
               for _ in range(3)]
    merged = fisher_merge(states, fishers, floor=1e-6)
    for n in ("a", "b"):
        th = np.stack([s[n].numpy() for s in states])
        fs = np.stack([f[n].numpy() for f in fishers])
        eps = 1e-6 * sum(f["a"].sum().item() + f["b"].sum().item() for f in fishers) / (3 * 38)
        w = np.maximum(fs, eps)
        np.testing.assert_allclose(merged[n].numpy(), (w * th).sum(0) / w.sum(0), rtol=1e-13)
    # zero Fisher everywhere (b): one floor for all models makes it the plain average
    np.testing.assert_allclose(merged["b"].numpy(), np.mean([s["b"].numpy() for s in states], 0), rtol=1e-12)
    # identical models merge to themselves, by every method
    same = [states[0], {k: v.clone() for k, v in states[0].items()}]
    base = states[1]
    for got in (fisher_merge(same, fishers[:2]), average(same), ties_merge(same, base, keep=1.0)):
        for n in states[0]:
            torch.testing.assert_close(got[n], states[0][n], atol=1e-15, rtol=1e-13)
    # TIES: trim, elect sign, disjoint mean, against a per-entry loop (keep all: no trimming)
    got = ties_merge(states, base, keep=1.0)["a"].numpy()
    ref = np.zeros(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            taus = [s["a"][i, j].item() - base["a"][i, j].item() for s in states]
            sign = np.sign(sum(taus))
            agree = [t for t in taus if np.sign(t) == sign and t != 0]
            ref[i, j] = base["a"][i, j].item() + (sum(agree) / len(agree) if agree else 0.0)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    trimmed = ties_merge(states[:2], base, keep=0.2)["a"] - base["a"]
    assert int((trimmed != 0).sum()) <= 2 * round(0.2 * 35)  # each task vector keeps its top 20%


@pytest.fixture(scope="module")
def fine_tuned(trained_llama, tmp_path_factory):  # noqa: F811
    """The trained Llama fine-tuned 15 more steps on different text (a real second task)."""
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(trained_llama)
    docs, _ = default_text()
    ids = torch.tensor(list("".join(docs[-30:]).encode()), dtype=torch.int64)
    checkpoints.train_on_windows(model, ids, steps=15, seed=1)
    out = tmp_path_factory.mktemp("fine-tuned")
    model.save_pretrained(out)
    texts = tmp_path_factory.mktemp("texts")
    (texts / "a.txt").write_text("".join(docs[:20]))
    (texts / "b.txt").write_text("".join(docs[-30:]))
    return out, texts


def test_merge_command_writes_a_checkpoint_that_loads(trained_llama, fine_tuned, tmp_path, capsys):  # noqa: F811
    import transformers as tf

    tuned, texts = fine_tuned
    out = tmp_path / "merged"
    args = ["merge", str(trained_llama), str(tuned), "--base", str(trained_llama), "--data", str(texts / "a.txt"),
            "--data", str(texts / "b.txt"), "--out", str(out), "--seq-len", "24", "--batches", "2", "--batch-size", "2",
            "--json", str(tmp_path / "m.json"), "--store", str(tmp_path / "s.sqlite")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fisher merge" in printed and "TIES" in printed and "average" in printed
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = tf.AutoModelForCausalLM.from_pretrained(out)  # transformers loads it as is
    # its weights are Σ F θ / Σ F with each model's Fisher on its own data
    kwargs = dict(seq_len=24, batches=2, batch_size=2, seed=0)
    a, b = load_model(trained_llama), load_model(tuned)
    fa = fisher_diagonal(Objective(a, load_data(a, texts / "a.txt", **kwargs)), FisherOptions(top_k=0)).values
    fb = fisher_diagonal(Objective(b, load_data(b, texts / "b.txt", **kwargs)), FisherOptions(top_k=0)).values
    eps = 1e-6 * sum(float(v.double().sum()) for f in (fa, fb) for v in f.values()) / (2 * a.parameter_count)
    got = dict(loaded.named_parameters())
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        wa, wb = fa[n].double().clamp(min=eps), fb[n].double().clamp(min=eps)
        ref = (wa * a.params[n].detach().double() + wb * b.params[n].detach().double()) / (wa + wb)
        torch.testing.assert_close(got[n].detach().double(), ref, atol=1e-6, rtol=1e-5)
    saved = json.loads((tmp_path / "m.json").read_text())
    losses = {r["model"]: r for r in saved["losses"]}
    assert set(losses) >= {"fisher merge", "average", "TIES", "written (merged)"}
    assert losses["written (merged)"]["a.txt"] == pytest.approx(losses["fisher merge"]["a.txt"], rel=1e-5)
    # a re-run reads both Fishers from the store
    assert main(args) == 0


def test_merge_nanogpt_writes_gpt2_format_and_bad_input(trained_run, trained_llama, tmp_path, capsys):  # noqa: F811
    import transformers as tf

    ckpts = trained_run["checkpoints"]
    out = tmp_path / "nano"
    assert main(["merge", ckpts[-2], ckpts[-1], "--out", str(out), "--method", "average", "--seq-len", "32",
                 "--batches", "1", "--batch-size", "2", "--store", str(tmp_path / "s.sqlite")]) == 0
    merged = tf.GPT2LMHeadModel.from_pretrained(out)
    a, b = load_model(ckpts[-2]), load_model(ckpts[-1])
    n = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(dict(merged.named_parameters())[n].detach(),
                               (a.params[n].detach() + b.params[n].detach()) / 2, atol=1e-7, rtol=1e-6)
    capsys.readouterr()
    assert main(["merge", ckpts[-1]]) == 2
    assert main(["merge", ckpts[-1], str(trained_llama), "--batches", "1"]) == 2
    assert main(["merge", ckpts[-2], ckpts[-1], "--method", "ties"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 3 and all(ln.startswith("layerscope: error:") for ln in lines)
    assert "at least two" in lines[0] and "cannot merge" in lines[1] and "--base" in lines[2]


def test_probe_command_with_fisher_prune_and_two_datasets(trained_run, tmp_path, capsys):
    from layerscope.report.document import Document, to_html
    from layerscope.report.fisher import fisher_section

    ckpt = trained_run["checkpoints"][-1]
    docs, _ = default_text()
    (tmp_path / "a.txt").write_text("".join(docs[:25]))
    (tmp_path / "b.txt").write_text("".join(docs[-25:]))
    out = tmp_path / "probe.json"
    args = ["probe", ckpt, "--fisher", "--prune", "0.2,0.6", "--data", str(tmp_path / "a.txt"), "--data",
            str(tmp_path / "b.txt"), "--seq-len", "32", "--batches", "3", "--batch-size", "2", "--fisher-top-k", "3",
            "--out", str(out), "--plot", str(tmp_path / "plots"), "--store", str(tmp_path / "s.sqlite")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Fisher information (empirical" in printed and "Fisher overlap a.txt ~ b.txt" in printed
    saved = json.loads(out.read_text())["fisher"]
    assert len(saved["summary"]["top_eigenvalues"]) == 3 and saved["summary"]["examples"] == 4  # 1 of 3 batches held out
    assert {r["method"] for r in saved["pruning"]["curves"]} == {"magnitude", "fisher", "taylor"}
    overlap = saved["overlap"]["a.txt ~ b.txt"]
    assert 0 < overlap["model"][0]["overlap"] < 1 and len(overlap["masks"]) == 2
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"fisher_layers.png", "fisher_heads.png", "pruning_curves.png"}
    # the report section renders (per-layer Fisher, head heatmap, pruning curves)
    from layerscope.probes.probe import probe

    result = probe(ckpt, str(tmp_path / "a.txt"), fisher={"kind": "true", "samples": 2, "top_k": 0}, prune=[0.3],
                   seq_len=32, batches=2, batch_size=2)
    assert result.fisher.kind == "true" and "fisher_heads" in result.tables()
    html = to_html(Document("t", "", [fisher_section(result.fisher, tmp_path / "fig", "gpt")]))
    assert "Fisher per attention head" in html and "pruning" in html
    capsys.readouterr()
    for bad in (["--prune", "1.5"], ["--fisher", "--fisher-samples", "0"], ["--prune", "0.5", "--batches", "1"]):
        assert main(["probe", ckpt, "--seq-len", "32", "--batch-size", "2"] + bad) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 3 and all(ln.startswith("layerscope: error:") for ln in err)
