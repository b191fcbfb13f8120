"""``compare --data``: per-layer debiased linear CKA between two checkpoints on the same tokens.

Real models: the nanoGPT of examples/train_gpt.py really trained on the CPU (``trained_run``), copies of
it and of the real MiniLM with one block's weights perturbed. References: Kornblith et al.'s NumPy
debiased CKA (Gram form, float64) on hidden states collected here with our own forward hooks, and the
exact structure of a one-block perturbation (every state before the block is untouched: CKA 1; after
it, below 1).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import checkpoints
from layerscope.cli import main
from layerscope.change.compare import compare
from layerscope.probes.representations import PairedCKA, cka_matrix
from reference import kornblith_cka

SMALL = dict(batches=2, batch_size=4, seq_len=32)




def _text_file(tmp_path):
    from pydoc_data.topics import topics

    path = tmp_path / "text.txt"
    path.write_text("\n".join(topics[k] for k in sorted(topics)[:60]), encoding="utf-8")
    return path


def _perturbed_nanogpt(ckpt, block: int, out, scale: float = 0.5):
    """A copy of a nanoGPT checkpoint whose block ``block`` weights get Gaussian noise (scale × their std)."""
    saved = torch.load(ckpt, weights_only=True)
    g = torch.Generator().manual_seed(1)
    for name, t in saved["model"].items():
        if name.startswith(f"transformer.h.{block}.") and t.ndim == 2:
            saved["model"][name] = t + scale * t.std() * torch.randn(t.shape, generator=g)
    torch.save(saved, out)
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return _text_file(tmp_path_factory.mktemp("cka-text"))


# -- the accumulated estimator ------------------------------------------------------------------------
def test_paired_cka_over_batches_equals_the_whole_matrix_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150, 12)) + 40.0  # a large common offset: the sums must not cancel
    y = x @ rng.standard_normal((12, 20)) + 0.7 * rng.standard_normal((150, 20)) - 25.0
    acc = PairedCKA()
    for rows in (slice(0, 7), slice(7, 90), slice(90, 150)):
        acc.add(torch.tensor(x[rows]), torch.tensor(y[rows]))
    want = kornblith_cka(x, y)
    assert acc.value() == pytest.approx(want, rel=1e-9)
    assert acc.value() == pytest.approx(cka_matrix([torch.tensor(x)], [torch.tensor(y)], method="gram")[0, 0], rel=1e-9)
    same = PairedCKA()
    same.add(torch.tensor(x[:70]), torch.tensor(3.0 * x[:70] + 5.0))
    same.add(torch.tensor(x[70:]), torch.tensor(3.0 * x[70:] + 5.0))
    assert same.value() == pytest.approx(1.0, abs=1e-10)
    unrelated = PairedCKA()
    unrelated.add(torch.tensor(x), torch.tensor(rng.standard_normal((150, 20))))
    assert abs(unrelated.value()) < 0.15


# -- on the trained nanoGPT ------------------------------------------------------------------------------
def test_cka_with_itself_is_one_and_a_perturbed_block_lowers_only_what_follows(trained_run, text, tmp_path):
    first, last = trained_run["checkpoints"][0], trained_run["checkpoints"][-1]
    store = tmp_path / "s.sqlite"
    itself = compare(last, last, data=text, spectral=False, store=str(store), **SMALL)
    assert len(itself.cka) == 3 and np.allclose(itself.cka["cka"], 1.0, atol=1e-9)
    assert list(itself.cka["state"]) == [0, 1, 2] and itself.cka["layer"].isna().iloc[0]

    pert = _perturbed_nanogpt(last, 1, tmp_path / "pert.pt", scale=2.0)
    r = compare(last, pert, data=text, spectral=False, store=str(store), **SMALL)
    cka = r.cka.set_index("state")["cka"]
    assert cka[0] == pytest.approx(1.0, abs=1e-9) and cka[1] == pytest.approx(1.0, abs=1e-9)  # before block 1
    assert cka[2] < 0.999  # after the perturbed block (the residual stream carries most of the state through)
    # the drift table's cka column: each matrix row carries its block's output CKA
    rows = r.table[r.table["layer"] == 1]
    assert len(rows) and np.allclose(rows["cka"], cka[2])
    assert r.table[r.table["layer"].isna()]["cka"].isna().all()

    trained = compare(first, last, data=text, spectral=False, store=str(store), **SMALL)
    assert (trained.cka["cka"] < 0.999).all()  # 200 steps of training apart: no layer is unchanged


def test_cka_equals_a_float64_reference_on_the_hidden_states(trained_run, text, tmp_path):
    from layerscope.probes import load_model
    from layerscope.probes.activations import activation_data, find_blocks

    first, last = trained_run["checkpoints"][1], trained_run["checkpoints"][-1]
    options = dict(batches=1, batch_size=2, seq_len=16)
    r = compare(first, last, data=text, spectral=False, store=str(tmp_path / "s.sqlite"), **options)
    states = []
    for path in (first, last):
        model = load_model(path)
        data = activation_data(model, text, **options)
        _, blocks = find_blocks(model)
        outs: dict[int, torch.Tensor] = {}
        hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
                 for i, b in enumerate(blocks)]
        with torch.no_grad():
            hs = model.module(input_ids=data.input_ids[0], output_hidden_states=True).hidden_states
        for h in hooks:
            h.remove()
        states.append([hs[0]] + [outs[i] for i in range(len(blocks))])
    for state, (sa, sb) in enumerate(zip(*states)):
        x = sa.reshape(-1, sa.shape[-1]).double().numpy()
        y = sb.reshape(-1, sb.shape[-1]).double().numpy()
        assert x.shape[0] == 32
        got = float(r.cka.set_index("state").loc[state, "cka"])
        assert got == pytest.approx(kornblith_cka(x, y), rel=1e-9, abs=1e-12)


def test_compare_cli_with_data_stores_and_reports(trained_run, text, tmp_path, capsys):
    from layerscope.config import Config
    from layerscope.probes.layer_cka import layer_cka
    from layerscope.report import report
    from layerscope.store import Store

    first, last = trained_run["checkpoints"][0], trained_run["checkpoints"][-1]
    store, out = tmp_path / "s.sqlite", tmp_path / "c.json"
    argv = ["compare", first, last, "--data", str(text), "--batches", "1", "--batch-size", "4", "--seq-len", "32",
            "--no-spectral", "--store", str(store)]
    assert main(argv + ["--out", str(out)]) == 0
    assert "debiased linear CKA" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert [row["state"] for row in payload["cka"]] == [0, 1, 2]
    assert all(0 < row["cka"] < 1 for row in payload["cka"])
    assert next(iter(payload["cka_data"].values()))[0]["tokens"] == 4 * 32
    with Store(store) as st:  # the same models and data again: from the store, neither model runs
        again = layer_cka(first, last, str(text), store=st, batches=1, batch_size=4, seq_len=32)
    assert again.from_store and np.allclose(again.rows["cka"], [r["cka"] for r in payload["cka"]])
    # the report's comparison section shows the stored CKA
    rep = report([first, last], Config(store=str(store)), out=tmp_path / "r" / "report.html",
                 markdown=tmp_path / "r" / "report.md")
    md = rep.markdown.read_text()
    assert "debiased linear CKA between" in md and "block 1" in md


def test_bad_data_and_different_tokenizers_are_one_line_errors(trained_run, text, tmp_path, capsys):
    import transformers as tf

    last = trained_run["checkpoints"][-1]
    store = ["--store", str(tmp_path / "s.sqlite")]
    assert main(["compare", last, last, "--data", str(tmp_path / "missing.txt")] + store) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err and "missing.txt" in err and "Traceback" not in err
    assert main(["compare", last, last, "--seq-len", "16"] + store) == 2
    assert "only with --data" in capsys.readouterr().err
    # another vocabulary (a GPT-2 of the same shape with 300 tokens): the same tokens cannot go to both
    cfg = tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=300)
    tf.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2-300")
    assert main(["compare", last, str(tmp_path / "gpt2-300"), "--data", str(text), "--no-spectral"] + store) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one tokenizer" in err and "300-token" in err
    # the same vocabulary size, another tokenizer (characters mapped to 255 − code): other token ids
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = tmp_path / "gpt2-permuted-bytes"
    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=256,
                                     bos_token_id=None, eos_token_id=None)).save_pretrained(other)
    vocab = {chr(i) if chr(i).isprintable() and not chr(i).isspace() else f"<{i}>": 255 - i for i in range(1, 256)}
    vocab["<|endoftext|>"] = 255  # GPT-2's tokenizer class adds it: inside the vocabulary
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(other / "tokenizer.json"))
    assert main(["compare", last, str(other), "--data", str(text), "--no-spectral"] + store) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "one tokenizer" in err and "different tokens" in err


# -- an encoder with a real tokenizer -------------------------------------------------------------------
def test_minilm_against_a_copy_with_one_block_perturbed(tmp_path):
    from safetensors.torch import load_file, save_file

    src = checkpoints.minilm_dir()
    copy = tmp_path / "minilm-perturbed"
    copy.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, copy / f.name)
    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if ".layer.3." in name and t.ndim == 2:
            tensors[name] = (t + 0.5 * t.std() * torch.randn(t.shape, generator=g)).contiguous()
    save_file(tensors, copy / "model.safetensors")
    texts = ["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. " * 6,
             "Researchers measure how similar two networks' representations are on the same inputs. " * 6]
    r = compare(src, copy, data=texts, spectral=False, procrustes=False, store=str(tmp_path / "s.sqlite"),
                batches=1, batch_size=2, seq_len=32)
    cka = r.cka.set_index("state")["cka"]
    assert len(cka) == 7  # embeddings + 6 blocks
    assert np.allclose(cka[[0, 1, 2, 3]], 1.0, atol=1e-9)  # up to block 2's output: the same weights
    assert (cka[[4, 5, 6]] < 0.999).all()  # from block 3 on


def test_model_dtype_flag_is_not_the_spectrum_precision():
    """``--dtype`` of the commands that run a model is the model's precision; it once also set Config.dtype
    (the spectrum's, float64/float32 only), so ``activations --dtype bfloat16`` failed before running."""
    from layerscope.cli import _config, build_parser

    for command in (["activations", "x"], ["probe", "x"], ["compare", "a", "b", "--data", "t.txt"]):
        args = build_parser().parse_args(command + ["--dtype", "bfloat16"])
        assert args.model_dtype == "bfloat16" and _config(args).dtype == "float64"
