"""The anatomy on tiny random instances of the ~40 best-known families (real config classes, saved
with save_pretrained), and ``heads`` against a direct float64 computation on the new layouts:
Falcon (multi-query fused), BLOOM (per-head interleaved), StarCoder (gpt_bigcode MQA), GPT-Neo,
GPT-J, CodeGen (mp4 fused), DeepSeek-V3 (multi-head latent attention), T5 (self + cross) and
Jamba (hybrid: the Mamba layer is skipped with its reason)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import layerscope
import tiny_families
from test_heads import direct_circuit

FAMILIES = ["gpt2", "gpt_neo", "gptj", "codegen", "gpt_neox", "bloom", "falcon", "gpt_bigcode", "llama", "mistral",
            "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
            "olmo", "olmo2", "stablelm", "starcoder2", "deepseek_v2", "deepseek_v3", "bert", "roberta", "distilbert",
            "albert", "electra", "deberta-v2", "mpnet", "modernbert", "t5", "mt5", "bart", "mbart", "jamba",
            "qwen3_next", "nemotron_h"]
ENC_DEC = {"t5", "mt5", "bart", "mbart"}
RTOL = 1e-6


def _build(family, tmp_path, prepare=None):
    path, model = tiny_families.build_tiny(family, tmp_path / family, prepare=prepare)
    return path, model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_matrix_has_a_role_and_the_dims_are_right(family, tmp_path):
    path, model = _build(family, tmp_path)
    anatomy = layerscope.inspect(path)
    assert anatomy.path == "skeleton"
    unclassified = [n for n, e in anatomy.entries.items() if len(e.shape) >= 2 and e.layer is None
                    and (".layers." in n or ".layer." in n or ".h." in n or ".block." in n)]
    assert not unclassified
    layer_mats = [e for e in anatomy.entries.values() if len(e.shape) in (2, 3) and e.layer is not None]
    assert layer_mats and all(e.role != "other" for e in layer_mats), [e.name for e in layer_mats if e.role == "other"]
    cfg = model.config
    d = anatomy.dims
    assert d.d_model == cfg.hidden_size and d.vocab_size == cfg.vocab_size
    if family in ("deepseek_v2", "deepseek_v3"):
        assert (d.n_heads, d.n_kv_heads, d.head_dim, d.v_head_dim, d.kv_lora_rank, d.q_lora_rank) == (
            cfg.num_attention_heads, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
            cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank)
    elif family in ("falcon", "gpt_bigcode"):
        assert (d.n_heads, d.n_kv_heads, d.head_dim) == (4, 1, 16)  # multi-query
    elif family == "gpt_neo":
        assert (d.n_heads, d.n_kv_heads, d.head_dim) == (4, 4, 16)
    else:
        assert d.n_heads == cfg.num_attention_heads
        assert d.head_dim == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if family in ENC_DEC:
        assert set(d.stacks) == {"encoder", "decoder"}
        assert {e.role for e in anatomy.entries.values() if e.stack == "decoder"} >= {"xattn.q", "xattn.k", "xattn.v", "xattn.o"}
        assert not any(e.role.startswith("xattn.") for e in anatomy.entries.values() if e.stack == "encoder")
    if family == "jamba":
        assert d.attention_layers == [1]
        roles = {e.role for e in anatomy.entries.values() if e.layer == 0}
        assert {"ssm.in", "ssm.out", "ssm.x", "ssm.dt", "ssm.conv"} <= roles and not roles & {"attn.q", "attn.o"}
    if family == "albert":
        assert anatomy.shared_layers
    if family in ("qwen2_moe", "qwen3_next"):
        assert {"moe.shared.gate", "moe.shared.up", "moe.shared.down", "moe.shared_gate"} <= anatomy.role_counts().keys()
    heads = layerscope.heads(path, store=str(tmp_path / "s.sqlite"))
    n_blocks = len(anatomy.attention)
    assert len(heads.table) == sum(s.n_heads for s in anatomy.attention) and n_blocks > 0
    keys = [c for c in ("stack", "attention", "layer", "head") if c in heads.table.columns]
    assert not heads.table.duplicated(subset=keys).any()


def _check(table, mask, per_head):
    """per_head: {head: (Q_h, K_h, V_h, O_h)} float64 in the model's own (out, in) layout."""
    rows = table[mask]
    for h, (q, k, v, o) in per_head.items():
        row = rows[rows["head"] == h].iloc[0]
        for circuit, a in (("qk", q.T @ k), ("ov", o @ v)):
            if a.shape[0] != a.shape[1]:  # rectangular: no eigenvalues, the row says so
                assert str(row[f"{circuit}_shape"]).startswith(f"{a.shape[0]}x{a.shape[1]}: rectangular")
                assert all(np.isnan(row[f"{circuit}_{c}"]) for c in ("asymmetry", "copying_score", "top_eig_abs"))
            for key, want in _direct(a).items():
                got = row[f"{circuit}_{key}"]
                if key == "energy_rank_99":
                    assert got == want
                else:  # asymmetry² = 2‖A‖² − 2 tr(A²) cancels: for a symmetric A it is exact only to √eps
                    tol = 1e-7 if key == "asymmetry" else 1e-12
                    assert got == pytest.approx(want, rel=1e-4, abs=tol), (circuit, key)


def _direct(a):
    """direct_circuit for a square circuit; its singular-value columns only for a rectangular one."""
    if a.shape[0] == a.shape[1]:
        return direct_circuit(a)
    s = np.linalg.svd(a, compute_uv=False)
    p, energy = s[s > 0] / s.sum(), np.cumsum(s**2)
    return {"spectral_norm": s[0], "frobenius_norm": np.linalg.norm(a), "entropy_rank": np.exp(-(p * np.log(p)).sum()),
            "energy_rank_99": int(np.searchsorted(energy, 0.99 * energy[-1]) + 1)}


def _np(t):
    return t.detach().double().numpy()


def _split_fused(attn, weight):
    """The model's own _split_heads applied to the fused weight: per head (hd, d) for q, k, v."""
    fused = weight.detach().double().T.unsqueeze(0)  # (1, d, out): the projection of the identity
    q, k, v = attn._split_heads(fused)
    return [_np(x[0].permute(1, 2, 0)) for x in (q, k, v)]  # (heads, hd, d)


@pytest.mark.parametrize("family", ["falcon", "bloom"])
def test_heads_fused_falcon_bloom(family, tmp_path):
    path, model = _build(family, tmp_path)
    table = layerscope.heads(path, store=str(tmp_path / "s.sqlite")).table
    assert len(table) == 2 * 4
    for layer, block in enumerate(model.transformer.h):
        attn = block.self_attention
        if family == "falcon":
            q, k, v = _split_fused(attn, attn.query_key_value.weight.double())
        else:  # BLOOM's forward: fused.view(..., num_heads, 3, head_dim)
            w = _np(attn.query_key_value.weight).reshape(4, 3, 16, 64)
            q, k, v = w[:, 0], w[:, 1], w[:, 2]
        o = _np(attn.dense.weight)
        hd = 16
        per_head = {h: (q[h], k[min(h, k.shape[0] - 1)], v[min(h, v.shape[0] - 1)], o[:, h * hd:(h + 1) * hd]) for h in range(4)}
        _check(table, table["layer"] == layer, per_head)


def test_heads_gpt_bigcode_multi_query(tmp_path):
    path, model = _build("gpt_bigcode", tmp_path)
    table = layerscope.heads(path, store=str(tmp_path / "s.sqlite")).table
    assert len(table) == 8 and set(table["kv_head"]) == {0}
    attn = model.transformer.h[1].attn
    w = _np(attn.c_attn.weight)  # nn.Linear (out, in): q (64) | k (16) | v (16), as in its forward
    q, k, v = w[:64], w[64:80], w[80:96]
    o = _np(attn.c_proj.weight)
    _check(table, table["layer"] == 1, {h: (q[h * 16:(h + 1) * 16], k, v, o[:, h * 16:(h + 1) * 16]) for h in range(4)})


@pytest.mark.parametrize("family", ["gpt_neo", "gptj", "codegen"])
def test_heads_gpt_neo_gptj_codegen(family, tmp_path):
    path, model = _build(family, tmp_path)
    table = layerscope.heads(path, store=str(tmp_path / "s.sqlite")).table
    assert len(table) == 2 * 4
    block = model.transformer.h[0]
    attn = block.attn.attention if family == "gpt_neo" else block.attn
    if family == "codegen":  # its forward: reshape (mp=4, local) and split query, value, key
        w = _np(attn.qkv_proj.weight).reshape(4, 3, 16, 64)
        q, v, k = (w[:, i].reshape(64, 64) for i in range(3))
    else:
        q, k, v = _np(attn.q_proj.weight), _np(attn.k_proj.weight), _np(attn.v_proj.weight)
    o = _np(attn.out_proj.weight)
    s = lambda m, h: m[h * 16:(h + 1) * 16]  # noqa: E731
    _check(table, table["layer"] == 0, {h: (s(q, h), s(k, h), s(v, h), o[:, h * 16:(h + 1) * 16]) for h in range(4)})


def _randomise_norms(model):
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "layernorm" in name and p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def test_heads_deepseek_v3_latent_attention(tmp_path):
    path, model = _build("deepseek_v3", tmp_path, prepare=_randomise_norms)
    cfg = model.config
    table = layerscope.heads(path, store=str(tmp_path / "s.sqlite")).table
    assert len(table) == cfg.num_hidden_layers * cfg.num_attention_heads
    attn = model.model.layers[0].self_attn
    nh, nope, rope, vd, r = 4, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    qa, qb = _np(attn.q_a_proj.weight), _np(attn.q_b_proj.weight)
    gq, gkv = _np(attn.q_a_layernorm.weight), _np(attn.kv_a_layernorm.weight)
    kva, kvb = _np(attn.kv_a_proj_with_mqa.weight), _np(attn.kv_b_proj.weight)
    assert not np.allclose(gq, 1)  # the norm weights really enter the circuit
    q_all = (qb @ np.diag(gq) @ qa).reshape(nh, nope + rope, -1)  # forward: q_b(norm(q_a(x))).view(nh, qk_head_dim)
    kv = (kvb @ np.diag(gkv) @ kva[:r]).reshape(nh, nope + vd, -1)  # kv_b(norm(c_kv)).view(nh, nope + v)
    o = _np(attn.o_proj.weight)
    per_head = {}
    for h in range(nh):
        k_h = np.concatenate([kv[h, :nope], kva[r:r + rope]])  # k = [k_nope_h ; shared k_rope]
        per_head[h] = (q_all[h], k_h, kv[h, nope:], o[:, h * vd:(h + 1) * vd])
    _check(table, table["layer"] == 0, per_head)


def test_heads_t5_self_and_cross_attention(tmp_path):
    path, model = _build("t5", tmp_path)
    table = layerscope.heads(path, store=str(tmp_path / "s.sqlite")).table
    assert len(table) == 3 * 2 * 4  # encoder self, decoder self, decoder cross; 2 layers; 4 heads
    assert set(zip(table["stack"], table["attention"])) == {("encoder", "self"), ("decoder", "self"), ("decoder", "cross")}
    for stack, sub, kind in (("decoder", 1, "cross"), ("encoder", 0, "self")):
        attn = getattr(model, stack).block[1].layer[sub]
        attn = attn.EncDecAttention if kind == "cross" else attn.SelfAttention
        q, k, v, o = (_np(getattr(attn, x).weight) for x in "qkvo")
        s = lambda m, h: m[h * 16:(h + 1) * 16]  # noqa: E731
        mask = (table["stack"] == stack) & (table["attention"] == kind) & (table["layer"] == 1)
        _check(table, mask, {h: (s(q, h), s(k, h), s(v, h), o[:, h * 16:(h + 1) * 16]) for h in range(4)})


def test_heads_hybrid_skips_the_mamba_layer_with_its_reason(tmp_path):
    path, model = _build("jamba", tmp_path)
    result = layerscope.heads(path, store=str(tmp_path / "s.sqlite"))
    assert sorted(set(result.table["layer"])) == [1] and len(result.table) == 4
    assert [(s.layer, "SSM" in s.reason) for s in result.skipped] == [(0, True)]
    attn = model.model.layers[1].self_attn
    q, k, v, o = (_np(getattr(attn, f"{x}_proj").weight) for x in "qkvo")
    s = lambda m, h: m[h * 16:(h + 1) * 16]  # noqa: E731
    _check(result.table, result.table["layer"] == 1,
           {h: (s(q, h), s(k, h // 2), s(v, h // 2), o[:, h * 16:(h + 1) * 16]) for h in range(4)})


def test_heads_mobilebert_rectangular_ov(tmp_path):
    """MobileBERT: q and k read the bottleneck (32), v the full width (64); OV_h = W_O,h W_V,h is 32 × 64."""
    path, model = _build("mobilebert", tmp_path)
    table = layerscope.heads(path, store=str(tmp_path / "s.sqlite")).table
    assert len(table) == 2 * 4
    attn = model.mobilebert.encoder.layer[1].attention
    q, k, v = (_np(getattr(attn.self, x).weight) for x in ("query", "key", "value"))
    o = _np(attn.output.dense.weight)
    assert q.shape[1] == 32 and v.shape[1] == 64  # the forward: query(bottleneck), value(layer input)
    s = lambda m, h: m[h * 8:(h + 1) * 8]  # noqa: E731
    _check(table, table["layer"] == 1, {h: (s(q, h), s(k, h), s(v, h), o[:, h * 8:(h + 1) * 8]) for h in range(4)})
    assert "qk_shape" not in table.columns  # QK is square (32 × 32): eigenvalue columns present
    assert table["qk_copying_score"].notna().all()


def test_heads_zamba2_shared_attention_reads_twice_the_width(tmp_path):
    """Zamba2's shared transformer attends over [hidden ; embeddings] (128 wide) and writes 64."""
    path, model = _build("zamba2", tmp_path)
    result = layerscope.heads(path, store=str(tmp_path / "s.sqlite"))
    layer = model.config.hybrid_layer_ids[0]
    attn = model.model.layers[layer].shared_transformer.self_attn
    nh, hd = attn.config.num_attention_heads, attn.head_dim
    assert len(result.table) == nh and set(result.table["layer"]) == {layer}
    q, k, v, o = (_np(getattr(attn, f"{x}_proj").weight) for x in "qkvo")
    s = lambda m, h: m[h * hd:(h + 1) * hd]  # noqa: E731
    g = nh // attn.config.num_key_value_heads
    _check(result.table, result.table["layer"] == layer,
           {h: (s(q, h), s(k, h // g), s(v, h // g), o[:, h * hd:(h + 1) * hd]) for h in range(nh)})


def test_heads_xlnet_three_dimensional_projections(tmp_path):
    """XLNet's q, k, v, o are (d_model, n_heads, head_dim) parameters; its forward is
    einsum("ibh,hnd->ibnd", x, q) and einsum("ibnd,hnd->ibh", attn_vec, o): head h is W[:, h, :]."""
    path, model = _build("xlnet", tmp_path)
    anatomy = layerscope.inspect(path)
    roles = {n.rsplit(".", 1)[1]: e.role for n, e in anatomy.entries.items() if ".layer.1.rel_attn." in n}
    assert (roles["q"], roles["k"], roles["v"], roles["o"], roles["r"]) == ("attn.q", "attn.k", "attn.v", "attn.o", "attn.aux")
    table = layerscope.heads(path, store=str(tmp_path / "s.sqlite")).table
    attn = model.transformer.layer[1].rel_attn
    nh = attn.n_head
    assert len(table) == 2 * nh
    q, k, v, o = (_np(getattr(attn, x)) for x in "qkvo")  # (d_model, n_heads, head_dim)
    _check(table, table["layer"] == 1, {h: (q[:, h].T, k[:, h].T, v[:, h].T, o[:, h]) for h in range(nh)})


def test_heads_reformer_lsh_shared_query_key(tmp_path):
    """Reformer's LSH layer has one query_key projection (keys are the normalised queries): QK_h = W_QK,hᵀ W_QK,h."""
    path, model = _build("reformer", tmp_path)
    table = layerscope.heads(path, store=str(tmp_path / "s.sqlite")).table
    layers = model.reformer.encoder.layers
    kinds = [type(b.attention.self_attention).__name__ for b in layers]
    assert kinds == ["LocalSelfAttention", "LSHSelfAttention"]
    nh, hd = model.config.num_attention_heads, model.config.attention_head_size
    assert len(table) == len(layers) * nh
    s = lambda m, h: m[h * hd:(h + 1) * hd]  # noqa: E731
    for i, block in enumerate(layers):
        att = block.attention.self_attention
        q = _np(att.query_key.weight if i == 1 else att.query.weight)
        k = q if i == 1 else _np(att.key.weight)
        v, o = _np(att.value.weight), _np(block.attention.output.dense.weight)
        _check(table, table["layer"] == i, {h: (s(q, h), s(k, h), s(v, h), o[:, h * hd:(h + 1) * hd]) for h in range(nh)})
    lsh = table[table["layer"] == 1]
    assert np.allclose(lsh["qk_asymmetry"], 0, atol=1e-7)  # W_QKᵀ W_QK is symmetric


def test_heads_gemma3n_kv_shared_layers_use_the_storing_layers_k_v(tmp_path):
    """Gemma-3n's last num_kv_shared_layers own only q and o; their forward reads the k, v states stored by
    the layer that transformers' ``kv_sharing_modes`` marks "store" for the same layer type."""
    path, model = _build("gemma3n_text", tmp_path)
    cfg = model.config
    modes = cfg.kv_sharing_modes
    assert "reuse" in modes  # the tiny instance really shares
    table = layerscope.heads(path, store=str(tmp_path / "s.sqlite")).table
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert len(table) == cfg.num_hidden_layers * nh
    s = lambda m, h: m[h * hd:(h + 1) * hd]  # noqa: E731
    g = nh // nkv
    for i, mode in enumerate(modes):
        if mode != "reuse":
            continue
        attn = model.model.layers[i].self_attn
        assert attn.is_kv_shared_layer and not hasattr(attn, "k_proj")
        store = next(j for j, m in enumerate(modes) if m == "store" and cfg.layer_types[j] == cfg.layer_types[i])
        donor = model.model.layers[store].self_attn
        q, o = _np(attn.q_proj.weight), _np(attn.o_proj.weight)
        k, v = _np(donor.k_proj.weight), _np(donor.v_proj.weight)
        _check(table, table["layer"] == i, {h: (s(q, h), s(k, h // g), s(v, h // g), o[:, h * hd:(h + 1) * hd]) for h in range(nh)})


def test_second_info_on_the_same_config_does_not_import_transformers(tmp_path, _layerscope_cache_dir):
    """The skeleton's facts are cached on disk keyed by (transformers version, config): a second
    ``info`` reads them and never imports transformers, and gives the same anatomy."""
    import json
    import os
    import subprocess
    import sys

    path, _ = _build("llama", tmp_path)
    probe = ("import sys, json, layerscope; from layerscope.cli import main; rc = main(['info', sys.argv[1]]); "
             "a = layerscope.inspect(sys.argv[1]); "
             "print(json.dumps({'rc': rc, 'tf': 'transformers' in sys.modules, 'path': a.path, "
             "'roles': sorted((n, e.role, e.layer) for n, e in a.entries.items())}))")
    env = {**os.environ, "LAYERSCOPE_CACHE_DIR": str(_layerscope_cache_dir),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["tf"] and not runs[1]["tf"]
    assert runs[0]["rc"] == runs[1]["rc"] == 0
    assert runs[0]["path"] == runs[1]["path"] == "skeleton"
    assert runs[0]["roles"] == runs[1]["roles"]
    assert list((_layerscope_cache_dir / "skeletons").glob("*.json"))


def test_encoder_decoder_views_keep_encoder_and_decoder_layers_apart(tmp_path):
    """analyze's rows carry the stack; the per-layer tables, heads tables and head labels group by
    (stack, layer), so T5's encoder layer 0 and decoder layer 0 are separate rows. One-stack models
    keep their table as it was (no stack column, integer layers)."""
    import io

    from rich.console import Console

    from layerscope.report import depth
    from layerscope.views import print_heads, print_summary

    path, model = _build("t5", tmp_path)
    res = layerscope.analyze(path, store=str(tmp_path / "s.sqlite"), metrics=["entropy_rank", "frobenius_norm"])
    t = res.table
    assert set(t[t["layer"].notna()]["stack"]) == {"encoder", "decoder"}
    q = t[t["role"] == "attn.q"]
    assert sorted(zip(q["stack"], q["layer"])) == [("decoder", 0), ("decoder", 1), ("encoder", 0), ("encoder", 1)]
    buf = io.StringIO()
    print_summary(res, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "enc L0" in text and "dec L0" in text and "dec L1" in text
    # the encoder's q series is the encoder's own matrices, mean per layer
    s = depth.layer_series(t, "encoder attn.q", "frobenius_norm")
    want = q[q["stack"] == "encoder"].set_index("layer")["frobenius_norm"]
    assert list(s.index) == [0, 1] and np.allclose(s.to_numpy(), want.sort_index().to_numpy())
    assert "encoder attn.q" in depth.layered_roles(t) and "decoder attn.q" in depth.layered_roles(t)

    h = layerscope.heads(path, store=str(tmp_path / "s.sqlite"))
    labels = [w for _, heads_, _ in h.categories.items() for w, _ in heads_]
    assert all(isinstance(w, str) and w.split(" ")[0] in ("enc", "dec") and " L" in w for w in labels)
    # non-vacuous: every head made "low-rank" goes through the same stack-aware labels
    from layerscope.views import layer_label
    from layerscope.weights.heads import categorise, head_label

    flat = h.table.assign(qk_entropy_rank=0.0)
    cats = categorise(flat, h.anatomy.dims.head_dim, h.anatomy.dims.d_model, 0,
                      lambda r: layer_label((r.stack, int(r.layer), r.attention)))
    shown = {head_label(w, k) for w, k in cats.low_rank}
    assert len(shown) == len(h.table) and "enc L0 H0" in shown and "dec L1 cross H1" in shown
    buf = io.StringIO()
    print_heads(h, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "enc L1" in text and "dec L1 cross" in text and "dec0x" not in text

    path, _ = _build("llama", tmp_path)
    one = layerscope.analyze(path, store=str(tmp_path / "s.sqlite"), metrics=["frobenius_norm"]).table
    assert "stack" not in one.columns
    single = layerscope.heads(path, store=str(tmp_path / "s.sqlite"))
    assert "stack" not in single.table.columns and all(isinstance(w, int) for w, _ in single.low_rank + single.high_rank)
