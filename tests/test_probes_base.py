"""The probes' base: runnable models, data batches and the loss, on real (really trained) models.

References are independent: nanoGPT's own model for the nanoGPT -> GPT-2 mapping, transformers' own
``labels=`` loss for HF models, a Python loop of per-example backward passes for ``vmap(grad)``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import checkpoints
from layerscope.errors import LayerscopeError
from layerscope.probes import Objective, from_module, from_pairs, load_data, load_model, make_batches, read_texts
from layerscope.probes.data import IGNORE, byte_tokenizer, default_text


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """A tiny HF Llama (checkpoints.tiny_config) trained 40 AdamW steps on CPU on bytes of the default text."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(checkpoints.tiny_config("llama"))
    docs, _ = default_text()
    ids = torch.tensor(list("".join(docs[:20]).encode()), dtype=torch.int64)
    losses = checkpoints.train_on_windows(model, ids, steps=40, seed=0)
    assert losses[-1] < losses[0] - 1.0  # it really learnt something
    out = tmp_path_factory.mktemp("trained-llama")
    model.save_pretrained(out)
    return out


def test_nanogpt_mapped_onto_gpt2_gives_nanogpts_logits(trained_run):
    ckpt = trained_run["checkpoints"][-1]
    ref = checkpoints.nanogpt_reference(ckpt)
    model = load_model(ckpt)
    assert model.kind == "causal" and model.anatomy.family == "gpt2"
    # bias=False in train_gpt: GPT-2's biases are zero constants, not probe parameters
    assert model.constants and all(n.endswith(".bias") for n in model.constants)
    assert all(float(c.abs().max()) == 0.0 and not c.requires_grad for c in model.constants.values())
    assert [n for n, p in model.module.named_parameters() if p.requires_grad] == list(model.params)
    assert model.parameter_count == sum(p.numel() for p in ref.parameters())
    x = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, ref_loss = ref(x, x)
        got = model.module(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_nanogpt_with_biases_and_compiled_prefix(tmp_path):
    path = checkpoints.build_nanogpt(tmp_path, bias=True, compiled=True)
    ref = checkpoints.nanogpt_reference(path)
    model = load_model(path)
    assert not model.constants  # every GPT-2 bias exists in this nanoGPT
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.module(input_ids=x).logits, ref(x, x)[0], atol=2e-5, rtol=1e-5)
    # the anatomy's per-head q slice of the Conv1D c_attn is nanoGPT's Linear rows of that head
    name = "transformer.h.1.attn.c_attn.weight"
    q3 = [s for s in model.head_slices(name) if s.kind == "q" and s.head == 3][0]
    v0 = [s for s in model.head_slices(name) if s.kind == "v" and s.head == 0][0]
    w = ref.transformer.h[1].attn.c_attn.weight.detach()
    torch.testing.assert_close(q3.select(model.params[name].detach()), w[48:64])
    torch.testing.assert_close(v0.select(model.params[name].detach()), w[128:144])
    o2 = [s for s in model.head_slices("transformer.h.0.attn.c_proj.weight") if s.head == 2][0]
    torch.testing.assert_close(o2.select(model.params["transformer.h.0.attn.c_proj.weight"].detach()).T,
                               ref.transformer.h[0].attn.c_proj.weight.detach()[:, 32:48])


def test_trained_nanogpt_loss_equals_nanogpts_own(trained_run):
    ckpt = trained_run["checkpoints"][-1]
    ref = checkpoints.nanogpt_reference(ckpt)
    model = load_model(ckpt)
    data = load_data(model, None, seq_len=64, batches=2, batch_size=4, seed=3)
    assert data.input_ids.shape == (2, 4, 64) and data.tokens == 512
    result = Objective(model, data).evaluate()
    with torch.no_grad():
        own = sum(float(ref(data.input_ids[b], data.labels[b])[1]) for b in range(2)) / 2
    assert result.loss == pytest.approx(own, rel=1e-5)
    assert result.perplexity == pytest.approx(torch.exp(torch.tensor(own)).item(), rel=1e-5)
    # trained on stdlib code, evaluated on held-out prose: far better than uniform over bytes
    assert result.loss < 0.8 * torch.log(torch.tensor(256.0)).item()


def test_trained_llama_loss_matches_transformers_and_chunked_head(trained_llama):
    model = load_model(trained_llama)
    assert model.kind == "causal" and model.anatomy.family == "llama"
    data = load_data(model, None, seq_len=48, batches=3, batch_size=2, seed=0)
    obj = Objective(model, data)
    result = obj.evaluate()
    with torch.no_grad():  # transformers shifts the labels itself: feed the window w[0..T]
        own = 0.0
        for b in range(3):
            window = torch.cat([data.input_ids[b], data.labels[b][:, -1:]], dim=1)
            own += float(model.module(input_ids=window, labels=window).loss) / 3
    assert result.loss == pytest.approx(own, rel=1e-5)
    assert result.loss < 4.5  # trained: well under log(256) = 5.55

    # the chunked head (one 5-position chunk of logits at a time) gives the same loss, gradient and HVP
    chunked = Objective(model, data, chunk_bytes=2 * 256 * 4 * 5)
    assert chunked.token_loss.chunk_positions == 5 and chunked.token_loss.splittable
    params = list(model.params.values())
    v = [torch.randn_like(p) for p in params]
    outs = []
    for o in (obj, chunked):
        loss = o.batch_term(0)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
        outs.append((loss.detach(), [g.detach() for g in grads], hv))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1] + list(outs[0][2]), outs[1][1] + list(outs[1][2])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_functional_and_per_example_forms_agree(trained_llama):
    model = load_model(trained_llama)
    data = load_data(model, None, seq_len=16, batches=2, batch_size=3, seed=5)
    obj = Objective(model, data)
    params = {k: v.detach() for k, v in model.params.items()}
    assert float(obj.functional_loss(params)) == pytest.approx(obj.evaluate().loss, rel=1e-6)
    # L = Σ weight · per_example_loss
    total = 0.0
    for b in range(2):
        x, y = obj.examples(b)
        per = torch.func.vmap(obj.per_example_loss, in_dims=(None, 0))(params, (x, y))
        total += float((per.double() * obj.example_weights(b)).sum())
    assert total == pytest.approx(obj.evaluate().loss, rel=1e-6)
    # vmap(grad(per_example_loss)) equals a loop of one backward per example
    x, y = obj.examples(1)
    name = "model.layers.1.self_attn.q_proj.weight"
    grads = torch.func.vmap(torch.func.grad(obj.per_example_loss), in_dims=(None, 0))(params, (x, y))[name]
    for i in range(3):
        model.module.zero_grad()
        logits = model.module(input_ids=x[i:i + 1]).logits
        loss = torch.nn.functional.cross_entropy(logits[0], y[i])
        (g,) = torch.autograd.grad(loss, model.params[name])
        torch.testing.assert_close(grads[i], g, atol=1e-6, rtol=1e-4)


def test_head_slices_partition_every_attention_tensor(arch_checkpoints):
    for arch in ("llama", "gpt2", "gpt_neox", "phi3", "qwen2"):
        model = load_model(arch_checkpoints[arch])
        d = model.anatomy.dims
        sliced = 0
        for name, p in model.params.items():
            slices = model.head_slices(name)
            if not slices:
                continue
            sliced += 1
            marker = torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape)
            seen = torch.cat([s.select(marker).reshape(-1) for s in slices])
            # every entry in exactly one head
            assert sorted(seen.tolist()) == list(range(p.numel())), (arch, name)
            kinds = {s.kind for s in slices}
            for kind in kinds:
                heads = [s.head for s in slices if s.kind == kind]
                assert heads == list(range(d.n_heads if kind in ("q", "o") else d.n_kv_heads)), (arch, name, kind)
        assert sliced >= 2 * d.n_layers, arch


def test_weights_hash_is_content_not_format(tmp_path):
    a = load_model(checkpoints.build_hf("llama", tmp_path / "st", fmt="safetensors"))
    b = load_model(checkpoints.build_hf("llama", tmp_path / "bin", fmt="bin"))
    c = load_model(checkpoints.build_hf("llama", tmp_path / "other", fmt="safetensors", seed=1))
    assert a.weights_hash == b.weights_hash != c.weights_hash


def test_minilm_without_lm_head_is_one_line():
    model = load_model(checkpoints.minilm_dir())
    assert model.kind == "base"
    with pytest.raises(LayerscopeError) as err:
        load_data(model, None)
    assert "without a language-model head" in str(err.value) and "\n" not in str(err.value)


def test_masked_lm_loss_matches_transformers(tmp_path):
    """BERT masked LM with MiniLM's real tokenizer: seeded 15% masking; the loss is transformers' own."""
    import transformers as tf

    config = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    tf.BertForMaskedLM(config).save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(checkpoints.minilm_dir() / f, tmp_path / f)
    model = load_model(tmp_path)
    assert model.kind == "masked"
    data = load_data(model, None, seq_len=32, batches=2, batch_size=4, seed=1)
    assert data.input_ids[0, 0, 0] == 101 and data.input_ids[0, 0, -1] == 102  # [CLS] ... [SEP]
    share = data.tokens / (2 * 4 * 30)
    assert 0.08 < share < 0.25  # ~15% of the non-special positions
    assert (data.input_ids == 103).sum() > 0.6 * data.tokens  # mostly [MASK]
    again = load_data(model, None, seq_len=32, batches=2, batch_size=4, seed=1)
    assert again.hash == data.hash and load_data(model, None, seq_len=32, batches=2, batch_size=4, seed=2).hash != data.hash
    result = Objective(model, data).evaluate()
    with torch.no_grad():
        own = sum(float(model.module(input_ids=data.input_ids[b], labels=data.labels[b]).loss) * int((data.labels[b] != IGNORE).sum())
                  for b in range(2)) / data.tokens
    assert result.loss == pytest.approx(own, rel=1e-5)


def test_data_formats_give_the_same_tokens(tmp_path, trained_llama):
    import pandas as pd

    model = load_model(trained_llama)
    docs, _ = default_text()
    docs = docs[:30]
    kwargs = dict(seq_len=32, batches=2, batch_size=4, seed=0)
    # the same documents in every format -> the same batches (and hash)
    (tmp_path / "folder").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "folder" / f"{i:03d}.txt").write_text(d)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    pd.DataFrame({"body": docs}).to_parquet(tmp_path / "docs.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    hashes = {load_data(model, tmp_path / p, text_field=tf, **kwargs).hash
              for p, tf in (("folder", None), ("docs.jsonl", "body"), ("docs.parquet", "body"), ("ds", "body"))}
    hashes.add(load_data(model, docs, **kwargs).hash)
    assert len(hashes) == 1
    # a single text file is one document: different packing, still valid
    (tmp_path / "one.txt").write_text("\n".join(docs))
    assert load_data(model, tmp_path / "one.txt", **kwargs).input_ids.shape == (2, 4, 32)
    assert load_data(model, docs, **dict(kwargs, seed=1)).hash not in hashes


@pytest.mark.parametrize("case, message", [
    ("empty", "empty"), ("short", "too short"), ("field", "no field 'text'"), ("column", "no column 'text'"),
    ("missing", "no such file"), ("mismatch", "tokenizer mismatch"), ("seq", "longer than the model"),
])
def test_bad_data_is_one_line(tmp_path, trained_llama, case, message):
    import pandas as pd

    model = load_model(trained_llama)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("just a few words")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    pd.DataFrame({"body": ["x"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(LayerscopeError) as err:
        if case == "mismatch":  # bytes >= 200 cannot be tokens of a 200-token vocabulary
            make_batches(["€" * 500], byte_tokenizer(), kind="causal", seq_len=8, batches=1, batch_size=1, vocab_size=200)
        elif case == "seq":
            load_data(model, None, seq_len=4096)
        else:
            path = {"empty": "empty.txt", "short": "short.txt", "field": "d.jsonl", "column": "d.parquet",
                    "missing": "nothing.txt"}[case]
            load_data(model, tmp_path / path, seq_len=32, batches=2, batch_size=4)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_live_module_with_loss_fn():
    """Any module: PyHessian's / curvlinops' call shape (model, loss_fn, [(X, y), ...])."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    X, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    model = from_module(net, torch.nn.CrossEntropyLoss())
    assert model.kind == "custom" and model.parameter_count == 5 * 8 + 8 + 8 * 3 + 3
    data = from_pairs([(X[:8], y[:8]), (X[8:], y[8:])])
    obj = Objective(model, data)
    with torch.no_grad():
        full = float(torch.nn.functional.cross_entropy(net(X), y))
    assert obj.evaluate().loss == pytest.approx(full, rel=1e-6)  # weighted by batch length
    params = {k: v.detach() for k, v in model.params.items()}
    assert float(obj.functional_loss(params)) == pytest.approx(full, rel=1e-6)
    per = torch.func.vmap(obj.per_example_loss, in_dims=(None, 0))(params, obj.examples(0))
    with torch.no_grad():
        torch.testing.assert_close(per, torch.nn.functional.cross_entropy(net(X[:8]), y[:8], reduction="none"))
    with pytest.raises(LayerscopeError, match="loss_fn"):
        from_module(torch.nn.Linear(2, 2))


def test_read_texts_datasets_missing_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": ["a b c"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(LayerscopeError, match="no column 'text'.*--text-field"):
        read_texts(tmp_path / "ds")
