"""Roles from names: the tables that say what a tensor is from its name alone.

Two uses. Without a skeleton (no config.json, nanoGPT, an unknown ``model_type``) ``classify``
reads the whole name against ``ROLE_RULES``. With a skeleton (see skeleton.py) the module tree
already says which kind of module owns a matrix (attention, cross-attention, SSM mixer, MoE,
MLP), and ``classify_in_context`` reads only the path *inside* that module against that kind's
small table, so ``out_proj`` is an attention output in BART but an SSM output in Mamba.
A new family is a few rows here, not a new branch.
"""

from __future__ import annotations

import re

ROLES = (
    "embed.token", "embed.position", "embed.type", "attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv",
    "mlp.up", "mlp.gate", "mlp.down", "mlp.gate_up", "moe.expert.up", "moe.expert.gate", "moe.expert.down",
    "moe.expert.gate_up", "moe.router", "norm", "lm_head", "bias", "other",
    # multi-head latent attention's low-rank factors (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-lite)
    "attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b",
    # one projection serving as both query and key (Reformer's LSH attention: shared-QK)
    "attn.qk",
    # attention extras: output gates, relative-position tables, anything else an attention module owns
    "attn.gate", "attn.position", "attn.aux",
    # cross-attention (encoder-decoder), with the entry's stack saying encoder / decoder
    "xattn.q", "xattn.k", "xattn.v", "xattn.o", "xattn.qkv", "xattn.kv", "xattn.gate", "xattn.aux",
    # shared experts and their gate
    "moe.shared.gate", "moe.shared.up", "moe.shared.down", "moe.shared.gate_up", "moe.shared_gate", "moe.aux",
    # MLP extras (not an up/gate/down projection)
    "mlp.aux",
    # non-attention mixers: SSM (Mamba), linear attention (GatedDeltaNet ...), short convolutions, RWKV ...
    "ssm.in", "ssm.out", "ssm.x", "ssm.dt", "ssm.conv", "ssm.q", "ssm.k", "ssm.v", "ssm.gate", "ssm.param", "ssm.aux",
)
#: Roles whose matrices are softmax-attention projections: what ``heads`` reads.
ATTENTION_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b",
                   "attn.qk")
CROSS_ROLES = ("xattn.q", "xattn.k", "xattn.v", "xattn.o", "xattn.qkv", "xattn.kv")


def _rule(role: str, *suffixes: str) -> tuple[str, re.Pattern]:
    return role, re.compile(r"(?:^|\.)(?:" + "|".join(suffixes) + r")$")


NORM_MODULE = r"(?:ln_?\w*|\w*layer_?norm\w*|\w*_norm|norm|rms_norm\w*|\w*LayerNorm)"
MIXER = r"(?:mixer|mamba|linear_attn|ssm|temporal_block|conv|rwkv|time_mix|feed_forward_mamba)"
CROSS = r"(?:encoder_attn|EncDecAttention|crossattention|cross_attn|src_attn)"

#: Ordered: the first rule whose pattern matches the end of the name wins (no-skeleton path).
ROLE_RULES: list[tuple[str, re.Pattern]] = [
    _rule("norm", NORM_MODULE + r"\.(?:weight|bias|scale)"),
    _rule("embed.token", r"(?:wte|embed_tokens|word_embeddings|embed_in|tok_embeddings|token_embedding|shared)\.weight"),
    _rule("embed.position", r"(?:wpe|position_embeddings|embed_positions|pos_embedding)\.weight"),
    _rule("embed.type", r"token_type_embeddings\.weight"),
    _rule("lm_head", r"lm_head\.weight", r"embed_out\.weight", r"predictions\.decoder\.weight"),
    _rule("moe.shared_gate", r"shared_expert_gate\.weight"),
    _rule("moe.shared.gate", r"shared_experts?\.(?:gate_proj|w1)\.weight"),
    _rule("moe.shared.up", r"shared_experts?\.(?:up_proj|w3)\.weight"),
    _rule("moe.shared.down", r"shared_experts?\.(?:down_proj|w2)\.weight"),
    _rule("moe.router", r"(?:block_sparse_moe|mlp|moe|feed_forward)\.(?:gate|router)(?:\.layer|\.classifier)?\.weight"),
    _rule("moe.expert.gate", r"experts\.\d+\.(?:w1|gate_proj)\.weight"),
    _rule("moe.expert.up", r"experts\.\d+\.(?:w3|up_proj)\.weight"),
    _rule("moe.expert.down", r"experts\.\d+\.(?:w2|down_proj)\.weight"),
    _rule("moe.expert.gate_up", r"experts\.gate_up_proj(?:\.weight)?"),
    _rule("moe.expert.down", r"experts\.down_proj(?:\.weight)?"),
    _rule("moe.expert.up", r"experts\.up_proj(?:\.weight)?"),
    _rule("attn.q_a", r"q_a_proj\.weight"),
    _rule("attn.q_b", r"q_b_proj\.weight"),
    _rule("attn.kv_a", r"kv_a_proj_with_mqa\.weight"),
    _rule("attn.kv_b", r"kv_b_proj\.weight"),
    _rule("ssm.in", MIXER + r"\.in_proj\w*\.weight"),
    _rule("ssm.out", MIXER + r"\.out_proj\.weight"),
    _rule("ssm.x", MIXER + r"\.x_proj\.weight"),
    _rule("ssm.dt", MIXER + r"\.dt_proj\.weight"),
    _rule("ssm.conv", MIXER + r"\.conv\w*\.weight"),
    _rule("ssm.param", MIXER + r"\.(?:A_log|D|dt_bias)"),
    _rule("xattn.q", CROSS + r"\.(?:q_proj|q|query)\.weight"),
    _rule("xattn.k", CROSS + r"\.(?:k_proj|k|key)\.weight"),
    _rule("xattn.v", CROSS + r"\.(?:v_proj|v|value)\.weight"),
    _rule("xattn.o", CROSS + r"\.(?:out_proj|o_proj|o|dense)\.weight"),
    _rule("attn.qkv", r"(?:c_attn|query_key_value|qkv_proj|Wqkv|qkv)\.weight"),
    _rule("attn.q", r"(?:q_proj|query|wq|q_lin|SelfAttention\.q)\.weight"),
    _rule("attn.k", r"(?:k_proj|key|wk|k_lin|SelfAttention\.k)\.weight"),
    _rule("attn.v", r"(?:v_proj|value|wv|v_lin|SelfAttention\.v)\.weight"),
    _rule("attn.o", r"(?:attn\.c_proj|o_proj|attention\.dense|attention\.output\.dense|out_proj|attention\.wo|self_attn\.dense|out_lin|self_attention\.dense|SelfAttention\.o|attn\.Wo)\.weight"),
    _rule("mlp.gate_up", r"gate_up_proj\.weight"),
    _rule("mlp.gate", r"(?:gate_proj|feed_forward\.w1|mlp\.w1|DenseReluDense\.wi_0)\.weight"),
    _rule("mlp.up", r"(?:up_proj|c_fc|dense_h_to_4h|intermediate\.dense|fc1|feed_forward\.w3|mlp\.w3|lin1|fc_in|DenseReluDense\.wi|DenseReluDense\.wi_1)\.weight"),
    _rule("mlp.down", r"(?:down_proj|mlp\.c_proj|dense_4h_to_h|output\.dense|fc2|feed_forward\.w2|mlp\.w2|lin2|fc_out|DenseReluDense\.wo)\.weight"),
    ("lm_head", re.compile(r"^output\.weight$")),
]

#: Tables for the path inside a module of known kind (skeleton path). Keys: the context kind.
#: Each pattern is matched against "<path inside the context module>.<parameter>".
CONTEXT_RULES: dict[str, list[tuple[str, re.Pattern]]] = {
    "attn": [
        _rule("norm", NORM_MODULE + r"\.(?:weight|bias|scale)"),
        # DeepSeek-V3.2-style lightning indexers and KV compressors score / shrink tokens: not the heads' q/k
        _rule("attn.aux", r"(?:indexer|compressor)\.[\w.]+"),
        _rule("attn.q_a", r"q_a_proj\.weight"), _rule("attn.q_b", r"q_b_proj\.weight"),
        _rule("attn.kv_a", r"kv_a_proj(?:_with_mqa)?\.weight"), _rule("attn.kv_b", r"kv_b_proj\.weight"),
        _rule("attn.qk", r"query_key\.weight"),  # Reformer LSH: keys are the (normalised) queries
        _rule("attn.qkv", r"(?:c_attn|query_key_value|qkv_proj|Wqkv|qkv|in_proj|qkv_linear|gqkv_proj)\.weight"),
        _rule("attn.q", r"(?:q_proj|query|q|wq|Wq|q_lin|query_proj|q_head|q_linear|project_q)\.weight"),
        _rule("attn.k", r"(?:k_proj|key|k|wk|Wk|k_lin|key_proj|k_head|k_linear|project_k)\.weight"),
        _rule("attn.v", r"(?:v_proj|value|v|wv|Wv|v_lin|value_proj|v_head|v_linear|project_v)\.weight"),
        _rule("attn.o", r"(?:o_proj|out_proj|o|dense|wo|out_lin|c_proj|Wo|output\.dense|output|post|o_net|out|"
                        r"dense_output|proj|out_linear|post_proj|attention_out)\.weight"),
        _rule("attn.gate", r"(?:g_proj|gate_proj|gate|gating|g|gate_linear)\.weight"),
        _rule("attn.position", r"(?:relative_attention_bias|rel_pos\w*|pos_proj|pos_q_proj|\w*position\w*)\.weight"),
    ],
    "mixer": [
        _rule("norm", NORM_MODULE + r"\.(?:weight|bias|scale)"),
        _rule("ssm.in", r"(?:in_proj\w*|input_proj|in_linear)\.weight"),
        _rule("ssm.out", r"(?:out_proj|o_proj|output|out|output_proj|proj_out)\.weight"),
        _rule("ssm.x", r"x_proj\.weight"), _rule("ssm.dt", r"dt_proj\.weight"),
        _rule("ssm.conv", r"\w*conv\w*\.weight"),
        _rule("ssm.q", r"(?:q_proj|query|q|wq|receptance)\.weight"),
        _rule("ssm.k", r"(?:k_proj|key|k|wk)\.weight"),
        _rule("ssm.v", r"(?:v_proj|value|v|wv)\.weight"),
        _rule("ssm.gate", r"(?:g_proj|gate_proj|gate|g|z_proj)\.weight"),
    ],
    "moe": [
        _rule("norm", NORM_MODULE + r"\.(?:weight|bias|scale)"),
        _rule("moe.shared_gate", r"shared_experts?_gate\.weight"),
        _rule("moe.shared.gate_up", r"shared_experts?\.(?:gate_up_proj|input_linear)(?:\.weight)?"),
        _rule("moe.shared.gate", r"shared_experts?\.(?:gate_proj|w1|wi_0)(?:\.weight)?"),
        _rule("moe.shared.up", r"shared_experts?\.(?:up_proj|w3|wi_1|fc1|wi)(?:\.weight)?"),
        _rule("moe.shared.down", r"shared_experts?\.(?:down_proj|w2|wo|fc2|output_linear)(?:\.weight)?"),
        _rule("moe.expert.gate_up", r"experts?\.(?:\d+\.)?(?:gate_up_proj|input_linear|w13|mlp\.w1)(?:\.weight)?"),
        _rule("moe.expert.gate", r"experts?\.(?:\d+\.)?(?:gate_proj|w1|wi_0)(?:\.weight)?"),
        _rule("moe.expert.up", r"experts?\.(?:\d+\.)?(?:up_proj|w3|wi_1|fc1|wi|linear_v|c_fc)(?:\.weight)?"),
        _rule("moe.expert.down", r"experts?\.(?:\d+\.)?(?:down_proj|w2|wo|fc2|output_linear|linear_1|mlp\.w2|c_proj)"
                                 r"(?:\.weight)?"),
        _rule("moe.router", r"(?:gate|router|wg|classifier|layer|gate\.wg|router\.layer|router\.classifier|"
                            r"switch|weight|gate\.weight)(?:\.weight)?"),
    ],
    "mlp": [
        _rule("norm", NORM_MODULE + r"\.(?:weight|bias|scale)"),
        _rule("mlp.gate_up", r"(?:gate_up_proj|up_gate_proj|Wi|input_linear|w12|fc1_g|gate_up)\.weight"),
        _rule("mlp.gate", r"(?:gate_proj|w1|wi_0|gate|fc11|w_gate|ff_gate)\.weight"),
        _rule("mlp.up", r"(?:up_proj|w3|wi_1|fc_in|fc1|c_fc|wi|dense_h_to_4h|lin1|dense1|layer_1|fc12|w_in|"
                        r"proj_up|linear_1|up|ff_in|intermediate_dense|w_0)\.weight"),
        _rule("mlp.down", r"(?:down_proj|w2|wo|fc_out|fc2|c_proj|dense_4h_to_h|lin2|dense2|layer_2|proj_down|w_out|"
                          r"linear_2|down|ff_out|output_dense|output_linear)\.weight"),
    ],
}

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.")
ANY_INDEX = re.compile(r"(?:^|\.)(?!experts\.|local_experts\.)(\w+)\.(\d+)\.")
EXPERT_PATTERN = re.compile(r"experts\.(\d+)\.")
STACK_PATTERN = re.compile(r"(?:^|\.)(encoder|decoder)\.")


def classify(name: str) -> str:
    is_bias = name.endswith(".bias")
    for role, pattern in ROLE_RULES:
        if pattern.search(name):
            return role
    return "bias" if is_bias else "other"


def classify_in_context(kind: str, inner: str) -> str | None:
    """Role of parameter path ``inner`` (relative to a module of kind ``kind``), or None."""
    if inner.endswith(".bias") or inner.endswith("_bias"):
        return "bias"
    prefix = "xattn" if kind == "xattn" else None
    for role, pattern in CONTEXT_RULES["attn" if kind == "xattn" else kind]:
        if pattern.search(inner):
            if prefix and role.startswith("attn."):
                role = {"attn.q_a": "xattn.q", "attn.q_b": "xattn.q", "attn.position": "xattn.aux"}.get(
                    role, "xattn." + role.split(".", 1)[1])
                if role not in ROLES:
                    role = "xattn.aux"
            return role
    return None


def layer_of(name: str) -> int | None:
    m = LAYER_PATTERN.search(name)
    if m:
        return int(m.group(1))
    m = ANY_INDEX.search(name)
    return int(m.group(2)) if m else None


def expert_of(name: str) -> int | None:
    m = EXPERT_PATTERN.search(name)
    return int(m.group(1)) if m else None


def stack_of(name: str) -> str:
    m = STACK_PATTERN.search(name)
    return m.group(1) if m else ""
