"""Write the committed seed corpus (tests/fuzz/corpus/<target>/): small valid inputs the fuzzer mutates.

Run once (``python tests/fuzz/make_corpus.py``); the files are committed so CI never rebuilds them.
"""

from __future__ import annotations

import io
import json
import struct

import torch

from targets import CORPUS, small_dataset_files, small_safetensors_bytes


def _write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def main() -> None:
    st = small_safetensors_bytes()
    _write("safetensors", "llama_tiny.safetensors", st)
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                         "b": {"dtype": "I64", "shape": [], "data_offsets": [12, 20]}}).encode()
    _write("safetensors", "bf16_scalar.safetensors", struct.pack("<Q", len(header)) + header + bytes(20))
    _write("safetensors", "empty_header.safetensors", struct.pack("<Q", 2) + b"{}")

    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
    _write("shard_index", "index.json", json.dumps(
        {"metadata": {"total_size": 1234}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}).encode())

    _write("config_json", "llama.json", json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "vocab_size": 16, "tie_word_embeddings": False}).encode())
    _write("config_json", "gpt2.json", json.dumps({"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1,
                                                    "vocab_size": 16, "n_positions": 32}).encode())

    _write("trainer_state", "trainer_state.json", json.dumps(
        {"global_step": 200, "epoch": 1.0, "log_history": [{"loss": 2.5, "step": 100}]}).encode())

    g = torch.Generator().manual_seed(0)
    model = {"_orig_mod.transformer.wte.weight": torch.randn(16, 8, generator=g),
             "_orig_mod.transformer.h.0.attn.c_attn.weight": torch.randn(24, 8, generator=g),
             "_orig_mod.transformer.h.0.mlp.c_proj.weight": torch.randn(8, 32, generator=g)}
    ckpt = {"model": model, "iter_num": 200, "best_val_loss": torch.tensor(2.5),
            "model_args": {"n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 16, "block_size": 32}}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    _write("torch_pickle", "nanogpt_ckpt.pt", buf.getvalue())
    buf = io.BytesIO()
    torch.save({"w": torch.randn(4, 3, generator=g)}, buf, _use_new_zipfile_serialization=False)
    _write("torch_pickle", "legacy_format.bin", buf.getvalue())

    data_seeds()


def data_seeds() -> None:
    """The probes' data readers: text, JSON Lines, Parquet, a datasets Arrow file (each long enough to
    give the two 9-token windows the targets pack, so the seeds reach make_batches)."""
    prose = "layerscope reads what the model does on text. "
    _write("data_text", "english.txt", (prose * 3).encode())
    _write("data_text", "unicode.txt", "naïve café — Ωμέγα, 漢字, emoji 🙂, tabs\tand\r\nCRLF lines.\n".encode())
    lines = [json.dumps({"text": prose * 2, "id": 1}), "", json.dumps({"text": "é \u00e9 \ud83d\ude42", "meta": {"a": [1, 2]}})]
    _write("data_jsonl", "docs.jsonl", "\n".join(lines).encode())
    import pandas as pd

    for compression in ("snappy", "none"):
        buf = io.BytesIO()
        pd.DataFrame({"text": [prose, prose * 2, "third"], "n": [1, 2, 3]}).to_parquet(buf, compression=compression)
        _write("data_parquet", f"docs_{compression}.parquet", buf.getvalue())
    arrow = next(v for k, v in small_dataset_files().items() if k.endswith(".arrow"))
    _write("data_datasets", "data-00000-of-00001.arrow", arrow)


if __name__ == "__main__":
    import sys

    data_seeds() if sys.argv[1:] == ["data"] else main()
