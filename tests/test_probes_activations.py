"""Activations probe on real models: a 2-layer attention-only GPT-2 really trained on the CPU to copy
(sequences that repeat a random block with a random period), its untrained copy, tiny real-config checkpoints and
the real MiniLM.

References: every head score is recomputed in float64 from the attention matrices with Python loops,
and the previous-token / duplicate-token / induction scores with TransformerLens' ``detect_head``
formula (TransformerLens itself is not a dependency: its ``head_detector.py`` pattern builders and
"mul" score are transcribed below, line for line); CKA against Kornblith et al.'s NumPy code
(Gram-matrix form, ``center_gram(unbiased=True)``); the lens against the model's own logits and loss.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import checkpoints
from layerscope.cli import main
from layerscope.probes import load_model
from layerscope.probes.activations import ActivationOptions, activations, find_blocks
from layerscope.probes.head_behaviour import detection_patterns
from layerscope.probes.lens import find_lens
from layerscope.probes.representations import cka_matrix
from reference import kornblith_cka

HEADS = 2  # examples/train_induction.py's model: 2 layers, 2 heads of 64 dims, attention only


@pytest.fixture(scope="module")
def induction_models(tmp_path_factory):
    """{"trained": folder, "untrained": folder}: the same initialisation, before and after
    examples/train_induction.py's training (1500 steps, about a minute on one idle core)."""
    import train_induction

    root = tmp_path_factory.mktemp("induction")
    model = train_induction.attention_only_gpt2(seed=0, heads=HEADS)
    model.save_pretrained(root / "untrained")
    assert train_induction.train(model, steps=1500, seed=0) < 0.1  # the repeats are predicted
    model.save_pretrained(root / "trained")
    return {"trained": root / "trained", "untrained": root / "untrained"}


SMALL = dict(batches=2, batch_size=4, seq_len=64)


@pytest.fixture(scope="module")
def trained_result(induction_models):
    return activations(induction_models["trained"], **SMALL)


# -- the claims -------------------------------------------------------------------------------------
def test_finds_previous_token_and_induction_heads_only_after_training(induction_models, trained_result):
    h = trained_result.heads
    assert (h[h.layer == 0]["prev_token"] >= 0.5).any(), h[["layer", "head", "prev_token"]]
    assert (h[h.layer == 1]["induction"] >= 0.5).any(), h[["layer", "head", "induction"]]
    assert h[h.layer == 1]["is_induction_head"].any() and h[h.layer == 0]["is_prev_token_head"].any()
    assert not h[h.layer == 0]["is_induction_head"].any()  # one layer cannot compose an induction circuit
    assert trained_result.summary["icl_loss_drop"] > 1.0  # the second copy is predicted from the first
    untrained = activations(induction_models["untrained"], **SMALL)
    assert untrained.heads["induction"].max() < 0.5 and not untrained.heads["is_induction_head"].any()
    assert abs(untrained.summary["icl_loss_drop"]) < 0.5
    # joined with the weight-based head table, row for row
    assert {"qk_entropy_rank", "ov_copying_score"} <= set(h.columns) and h["qk_entropy_rank"].notna().all()


def test_copying_in_context_without_the_induction_pattern_is_not_called_induction(tmp_path):
    """The same recipe with seed 2 learns to copy in context through heads that do not attend to the
    token after the earlier copy (README): a large in-context loss drop, yet no head is named an
    induction head, because the name follows the attention pattern, not the loss."""
    import train_induction

    model = train_induction.attention_only_gpt2(seed=2, heads=HEADS)
    assert train_induction.train(model, steps=1500, seed=2) < 0.5
    model.save_pretrained(tmp_path / "seed2")
    r = activations(tmp_path / "seed2", **SMALL)
    assert r.summary["icl_loss_drop"] > 5.0
    assert r.heads["induction"].max() < 0.1 and not r.heads["is_induction_head"].any()


def test_cli_on_checkpoint_path(induction_models, tmp_path, capsys):
    out = tmp_path / "act.json"
    code = main(["activations", str(induction_models["trained"]), "--batches", "1", "--batch-size", "4", "--seq-len",
                 "64", "--out", str(out), "--plot", str(tmp_path / "plots")])
    assert code == 0
    saved = json.loads(out.read_text())
    assert len(saved["heads"]) == 2 * HEADS and {"prev_token", "induction", "qk_entropy_rank"} <= set(saved["heads"][0])
    assert len(saved["lens"]) == 3 and len(saved["cka"]) == 3
    assert saved["neuron_layers"][0]["dead"] == 4  # the zeroed MLP: GELU(0) = 0 is never > 0
    assert (tmp_path / "plots" / "behaviour_induction.png").is_file() and (tmp_path / "plots" / "cka_layers.png").is_file()
    assert "induction" in capsys.readouterr().out
    # bad input: one line, exit 2
    assert main(["activations", str(tmp_path / "nope")]) == 2
    assert main(["activations", str(induction_models["trained"]), "--cka-tokens", "2"]) == 2


# -- scores against float64 loops and TransformerLens' formula ---------------------------------------
def _tl_previous(tokens):  # transformer_lens/head_detector.py, get_previous_token_head_detection_pattern
    detection_pattern = torch.zeros(tokens.shape[-1], tokens.shape[-1])
    detection_pattern[1:, :-1] = torch.eye(tokens.shape[-1] - 1)
    return torch.tril(detection_pattern)


def _tl_duplicate(tokens):  # get_duplicate_token_head_detection_pattern
    token_pattern = tokens.repeat(tokens.shape[-1], 1).numpy()
    eq_mask = np.equal(token_pattern, token_pattern.T).astype(int)
    np.fill_diagonal(eq_mask, 0)
    return torch.tril(torch.as_tensor(eq_mask.astype(int)).float())


def _tl_induction(tokens):  # get_induction_head_detection_pattern
    duplicate_pattern = _tl_duplicate(tokens)
    shifted_tensor = torch.roll(duplicate_pattern, shifts=1, dims=1)
    zeros_column = torch.zeros(duplicate_pattern.shape[0], 1)
    result_tensor = torch.cat((zeros_column, shifted_tensor[:, 1:]), dim=1)
    return torch.tril(result_tensor)


def _tl_mul_score(attention_pattern, detection_pattern):  # compute_head_attention_similarity_score, "mul"
    score = attention_pattern * detection_pattern
    return (score.sum() / attention_pattern.sum()).item()


def test_every_score_equals_float64_loops_and_transformerlens(induction_models, trained_result):
    model = load_model(induction_models["trained"])
    data = trained_result.data
    refs: dict[tuple[int, int], dict[str, list[float]]] = {}
    with torch.no_grad():
        for b in range(data.n_batches):
            ids = data.input_ids[b]
            atts = model.module(input_ids=ids, output_attentions=True).attentions
            for layer, att in enumerate(atts):
                a64 = att.to(torch.float64)
                for s in range(ids.shape[0]):
                    t = ids[s].tolist()
                    n = len(t)
                    for h in range(att.shape[1]):
                        A = a64[s, h]
                        r = refs.setdefault((layer, h), {})
                        total = float(A.sum())
                        prev = sum(float(A[i, i - 1]) for i in range(1, n)) / total
                        dup = sum(float(A[i, j]) for i in range(n) for j in range(i) if t[j] == t[i]) / total
                        ind = sum(float(A[i, j]) for i in range(n) for j in range(1, i + 1) if t[j - 1] == t[i]) / total
                        first = [float(A[i, 0]) for i in range(1, n)]
                        ent = [-sum(float(p) * math.log(float(p)) for p in A[i, : i + 1] if p > 0) for i in range(1, n)]
                        for k, v in (("prev_token", prev), ("duplicate_token", dup), ("induction_text", ind),
                                     ("first_token_share", np.mean(first)),
                                     ("sink_position_rate", np.mean([f > 0.3 for f in first])),
                                     ("attention_entropy", np.mean(ent))):
                            r.setdefault(k, []).append(v)
                        A32 = att[s, h].clone()
                        tok = ids[s]
                        for k, pat in (("tl_prev", _tl_previous), ("tl_dup", _tl_duplicate), ("tl_ind", _tl_induction)):
                            r.setdefault(k, []).append(_tl_mul_score(A32, pat(tok)))
    heads = trained_result.heads.set_index(["layer", "head"])
    for (layer, h), r in refs.items():
        row = heads.loc[(layer, h)]
        for k in ("prev_token", "duplicate_token", "induction_text", "first_token_share", "sink_position_rate",
                  "attention_entropy"):
            assert row[k] == pytest.approx(np.mean(r[k]), abs=2e-6), (layer, h, k)
        for mine, tl in (("prev_token", "tl_prev"), ("duplicate_token", "tl_dup"), ("induction_text", "tl_ind")):
            assert row[mine] == pytest.approx(np.mean(r[tl]), abs=2e-6), (layer, h, mine)
    assert heads["prev_token"].std() > 1e-3  # heads differ (not uniform attention): not a trivial comparison


def test_induction_score_on_repeated_random_tokens_is_the_direct_average(induction_models, trained_result):
    from layerscope.probes.head_behaviour import repeated_random_tokens

    model = load_model(induction_models["trained"])
    opts = ActivationOptions()
    half = trained_result.summary["induction_layout"]["half"]
    ids = repeated_random_tokens(256, half, opts.induction_seqs, opts.seed, None, (), torch.unique(trained_result.data.input_ids))
    assert torch.equal(ids[:, :half], ids[:, half:])
    with torch.no_grad():
        atts = model.module(input_ids=ids, output_attentions=True).attentions
    for layer, att in enumerate(atts):
        a = att.to(torch.float64)
        for h in range(a.shape[1]):
            ref = np.mean([float(a[s, h, q, q - half + 1]) for s in range(len(ids)) for q in range(half, 2 * half)])
            got = trained_result.heads.set_index(["layer", "head"]).loc[(layer, h), "induction"]
            assert got == pytest.approx(ref, abs=1e-9)


def test_detection_patterns_match_transformerlens():
    ids = torch.tensor([[5, 1, 5, 2, 1, 5, 2, 9]])
    pats = detection_patterns(ids)
    assert torch.equal(pats["duplicate_token"][0].float(), _tl_duplicate(ids[0]))
    assert torch.equal(pats["induction_text"][0].float(), _tl_induction(ids[0]))


# -- logit lens ---------------------------------------------------------------------------------------
def test_lens_at_the_last_layer_reproduces_the_models_logits(induction_models, trained_result):
    model = load_model(induction_models["trained"])
    name, blocks = find_blocks(model)
    lens, note = find_lens(model, name)
    assert lens is not None and not note and lens.norm is model.module.transformer.ln_f
    ids = trained_result.data.input_ids[0]
    captured = {}
    handle = blocks[-1].register_forward_hook(lambda m, a, o: captured.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = model.module(input_ids=ids, labels=trained_result.data.labels[0])
        mine = lens(captured["x"])
    handle.remove()
    assert torch.allclose(mine, out.logits, atol=1e-5, rtol=1e-5)
    # the lens table's last layer is the model: loss = transformers' loss, KL 0, full agreement
    losses = []
    with torch.no_grad():
        for b in range(trained_result.data.n_batches):
            losses.append(float(model.module(input_ids=trained_result.data.input_ids[b],
                                             labels=trained_result.data.input_ids[b]).loss))
    last = trained_result.lens.iloc[-1]
    ref_loss = []
    with torch.no_grad():
        for b in range(trained_result.data.n_batches):
            logits = model.module(input_ids=trained_result.data.input_ids[b]).logits.double()
            ref_loss.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), trained_result.data.labels[b].flatten()))
    assert last["loss"] == pytest.approx(float(torch.stack(ref_loss).mean()), rel=1e-5)
    assert last["kl_to_final"] == pytest.approx(0.0, abs=1e-9) and last["top1_agreement"] == 1.0
    assert len(trained_result.lens) == 3  # embeddings + 2 blocks
    assert trained_result.lens["mi_lower_bound"].iloc[-1] == pytest.approx(
        trained_result.summary["next_token_entropy"] - last["loss"])


def test_lens_skipped_with_a_note_on_an_encoder_and_works_with_gqa(tmp_path):
    enc = activations(checkpoints.minilm_dir(), ["The cat sat on the mat. " * 40, "Attention is what the model does. " * 40],
                      batches=1, batch_size=2, seq_len=32)
    assert enc.lens is None and any("logit lens: skipped" in n for n in enc.notes)
    assert len(enc.heads) == 6 * 12 and np.isfinite(enc.heads["prev_token"]).all()
    assert np.allclose(np.diag(enc.cka), 1.0)
    assert enc.summary["causal_attention"] is False
    llama = checkpoints.build_hf("llama", tmp_path / "llama")  # GQA: 4 query heads, 2 key/value heads
    r = activations(llama, **SMALL)
    assert len(r.heads) == 2 * 4 and r.lens is not None and len(r.lens) == 3
    assert r.lens["kl_to_final"].iloc[-1] == pytest.approx(0.0, abs=1e-9)


# -- representations and CKA ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gram", "features"])
def test_cka_against_reference_and_invariances(method):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 12))
    y = x @ rng.standard_normal((12, 20)) + 0.5 * rng.standard_normal((60, 20))
    got = cka_matrix([torch.tensor(x)], [torch.tensor(y)], method=method)[0, 0]
    assert got == pytest.approx(kornblith_cka(x, y), rel=1e-10)
    assert cka_matrix([torch.tensor(x)], method=method)[0, 0] == pytest.approx(1.0, abs=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    moved = cka_matrix([torch.tensor(x)], [torch.tensor(3.7 * y @ q)], method=method)[0, 0]
    assert moved == pytest.approx(got, rel=1e-10)
    unrelated = cka_matrix([torch.tensor(x)], [torch.tensor(rng.standard_normal((60, 20)))], method=method)[0, 0]
    assert abs(unrelated) < 0.2  # debiased: near 0 for independent features, even with n = 60


def test_representation_geometry_equals_direct_computation(induction_models, trained_result):
    model = load_model(induction_models["trained"])
    name, blocks = find_blocks(model)
    states: dict[int, list[torch.Tensor]] = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: states.setdefault(i + 1, []).append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        for b in range(trained_result.data.n_batches):
            hs = model.module(input_ids=trained_result.data.input_ids[b], output_hidden_states=True).hidden_states
            states.setdefault(0, []).append(hs[0])
    for h in hooks:
        h.remove()
    for layer, parts in states.items():
        x = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts]).double().numpy()
        row = trained_result.representations.set_index("layer").loc[layer]
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        c = u @ u.T
        n = len(x)
        assert row["anisotropy"] == pytest.approx((c.sum() - np.trace(c)) / (n * (n - 1)), abs=1e-7)  # float32 unit vectors
        assert row["norm_mean"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-6)  # float32 states
        ev = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 0, None)
        p = ev[ev > 0] / ev.sum()
        assert row["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert np.allclose(np.diag(trained_result.cka), 1.0)


# -- neurons ---------------------------------------------------------------------------------------------
def test_planted_dead_neuron_is_found_and_top_tokens_decode_to_the_text(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_inner=64, n_positions=64,
                                             vocab_size=256, bos_token_id=None, eos_token_id=None))
    with torch.no_grad():
        fc = model.transformer.h[1].mlp.c_fc  # Conv1D: weight (in, out)
        fc.weight[:, 7] = 0.0
        fc.bias[7] = -10.0  # GELU(-10) < 0: never active
    model.save_pretrained(tmp_path / "m")
    text = ["layerscope reads what the model does on text, token by token. " * 30]
    r = activations(tmp_path / "m", text, batches=1, batch_size=4, seq_len=48)
    assert (1, 7) in r.dead_neurons
    # frequencies against an independent hook point (the MLP's activation function output)
    acts = {}
    reloaded = load_model(tmp_path / "m")
    hooks = [blk.mlp.act.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o))
             for i, blk in enumerate(reloaded.module.transformer.h)]
    with torch.no_grad():
        reloaded.module(input_ids=r.data.input_ids[0])
    for h in hooks:
        h.remove()
    for layer, row in r.neuron_layers.set_index("layer").iterrows():
        freq = (acts[layer] > 0).double().reshape(-1, 64).mean(0)
        assert row["dead"] == int((freq == 0).sum())
        assert row["sparsity"] == pytest.approx(1 - float(freq.mean()), abs=1e-12)
    fed = text[0]
    assert r.neuron_examples
    for ex in r.neuron_examples:
        for e in ex["examples"]:
            assert (e["context"] + e["token"]) in fed
            assert e["activation"] > 0


# -- architectures beyond one causal stack (scripts/activations_coverage.py runs all of them) -----------
TEXTS = ["The cat sat on the mat and looked at the dog. " * 20, "Attention is what the model does on text. " * 20]


@pytest.mark.parametrize("family", ["t5", "mamba", "jamba"])
def test_encoder_decoders_ssms_and_hybrids_give_what_they_have_with_a_note(family, tmp_path):
    """T5: the encoder is read (its 2 × 4 self-attention heads, joined with the encoder's weight heads
    only), no lens. Mamba: no attention at all: behaviour skipped, representations still computed.
    Jamba (one attention layer of two): behaviour rows for the attention layer only."""
    import tiny_families

    path, model = tiny_families.build_tiny(family, tmp_path / family)
    r = activations(path, TEXTS, batches=1, batch_size=2, seq_len=16)
    assert len(r.representations) == model.config.num_hidden_layers + 1 if family != "t5" else len(r.representations) == 3
    assert np.isfinite(r.representations["effective_rank"]).all()
    if family == "t5":
        assert len(r.heads) == 2 * 4 and r.lens is None and any("encoder-decoder" in n for n in r.notes)
        assert r.heads["qk_entropy_rank"].notna().all()  # joined with the encoder's self-attention rows
        with torch.no_grad():  # layer 1 = encoder block 0's output, as the encoder's own hidden states say
            hs = model.get_encoder()(input_ids=r.data.input_ids[0], output_hidden_states=True).hidden_states
        states = torch.cat([h.reshape(-1, h.shape[-1]) for h in hs[:2]])
        assert r.representations.set_index("layer").loc[1, "norm_mean"] == pytest.approx(
            float(hs[1].reshape(-1, hs[1].shape[-1]).double().norm(dim=-1).mean()), rel=1e-5), states.shape
    elif family == "mamba":
        assert len(r.heads) == 0 and any(n.startswith("attention behaviour: skipped") for n in r.notes)
    else:
        attn_layers = sorted({i for i, t in enumerate(model.config.layers_block_type) if t == "attention"})
        assert sorted(r.heads["layer"].unique()) == attn_layers and len(r.heads) == 4 * len(attn_layers)
        assert r.heads[["prev_token", "induction"]].notna().all().all()


def test_other_checkpoint_cka_is_compares_estimator(induction_models, trained_result, tmp_path):
    """``activations(A, other=B)`` gives, per layer, the number ``compare A B --data`` gives (one
    estimator, every token): 1 against itself, below 1 against the untrained initialisation."""
    from layerscope import Config
    from layerscope.probes.layer_cka import layer_cka
    from layerscope.store import Store

    config = Config(store=str(tmp_path / "s.sqlite"))
    same = activations(induction_models["trained"], other=induction_models["trained"], config=config, **SMALL)
    assert list(same.cka_other["layer"]) == [0, 1, 2] and np.allclose(same.cka_other["cka_with_other"], 1.0, atol=1e-9)
    vs = activations(induction_models["trained"], other=induction_models["untrained"], config=config, **SMALL)
    with Store(tmp_path / "fresh.sqlite") as store:
        ref = layer_cka(induction_models["trained"], induction_models["untrained"], vs.data, store=store, cache=False)
    assert np.allclose(vs.cka_other["cka_with_other"], ref.rows["cka"], rtol=1e-12)
    assert (vs.cka_other["cka_with_other"].iloc[1:] < 0.99).all()


def test_states_that_are_not_one_row_per_token_are_refused_in_one_line(tmp_path, capsys):
    """CPM-Ant prepends prompt positions of its own: its states cannot be read against the text, so
    the CLI refuses with one line and exit 2 (scripts/activations_coverage.py: such models are refused,
    none crash)."""
    import tiny_families

    path, _ = tiny_families.build_tiny("cpmant", tmp_path / "cpmant")
    capsys.readouterr()
    assert main(["activations", str(path), "--batches", "1", "--batch-size", "2", "--seq-len", "16",
                 "--store", str(tmp_path / "s.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not one row per input token" in err and "Traceback" not in err
