"""Train, on the CPU in about a minute, a 2-layer attention-only GPT-2 that forms induction heads.

    python examples/train_induction.py --out induction-model
    layerscope activations induction-model

The data are rows that repeat a random block of tokens with a random period (14..32 tokens): after the
first period every token is predictable, but only by finding the earlier copy of the current token
and reading the token after it (an induction circuit: a previous-token head in layer 0 composed with
an induction head in layer 1). The period varies per row, so no position-based shortcut works; with
one fixed offset per batch (a sequence followed by its copy) GPT-2 learns to attend by position
instead, and the induction score rightly stays low.

Why these sizes: a head's QK circuit has rank at most head_dim, and it has to tell the 128 training
tokens apart; with head_dim 16 (4 heads of d_model 64) no induction head formed in 5000 steps, with
head_dim 64 (2 heads of d_model 128) it forms by step ~500. Periods shorter than 14 let some
initialisations settle on position-based partial solutions. The MLPs are zero and frozen (the model is
attention-only, as in Elhage et al. 2021), so the trained checkpoint is a plain GPT-2 checkpoint any
tool can read.

Not every seed finds the textbook circuit: of seeds 0-3, seeds 0 and 1 form a previous-token head in
layer 0 and an induction head in layer 1 (induction score 0.9); seeds 2 and 3 also learn to copy in
context (loss 0.2 on the repeats) through a circuit whose layer-1 heads do not attend to the token
after the earlier copy, and `layerscope activations` rightly names no induction head there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

PERIOD_RANGE = (14, 33)  # randint's bounds: periods 14..32
TRAIN_TOKENS = 128  # token ids 0..127: the byte range of English text, which the probes read
SEQ_LEN = 64


def attention_only_gpt2(seed: int = 0, heads: int = 2, d_model: int = 128):
    """A GPT-2 whose MLPs are zero and frozen: attention and the residual stream only."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.GPT2Config(n_layer=2, n_head=heads, n_embd=d_model, n_inner=4, n_positions=SEQ_LEN, vocab_size=256,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    model = tf.GPT2LMHeadModel(cfg)
    for block in model.transformer.h:
        for p in block.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    return model


def periodic_batch(gen: torch.Generator, rows: int = 32, seq_len: int = SEQ_LEN):
    """(ids, labels): each row repeats a random block with its own period P; labels (-100 = no loss)
    only after the first repeat has begun, since the first P + 1 tokens are unpredictable."""
    x = torch.randint(0, TRAIN_TOKENS, (rows, seq_len), generator=gen)
    y = torch.full_like(x, -100)
    for i in range(rows):
        period = int(torch.randint(*PERIOD_RANGE, (1,), generator=gen))
        x[i] = x[i, :period].repeat(seq_len // period + 1)[:seq_len]
        y[i, period + 1:] = x[i, period + 1:]
    return x, y


def train(model, steps: int = 1500, seed: int = 0, lr: float = 1e-3, log_every: int = 0) -> float:
    """AdamW on periodic batches, one thread (the result is the same on every machine); the last loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    try:
        for step in range(1, steps + 1):
            x, y = periodic_batch(gen)
            loss = model(input_ids=x, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if log_every and (step % log_every == 0 or step == steps):
                eta = (time.perf_counter() - start) / step * (steps - step)
                print(f"step {step}/{steps}  loss on the repeats {loss.item():.3f}  ETA {eta:.0f}s", flush=True)
    finally:
        torch.set_num_threads(threads)
    return float(loss.item())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="induction-model", help="folder for the trained checkpoint (HF format)")
    ap.add_argument("--untrained", default=None, help="also save the same initialisation, untrained, here")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = attention_only_gpt2(args.seed)
    if args.untrained:
        model.save_pretrained(args.untrained)
    try:
        train(model, args.steps, args.seed, log_every=100)
    except KeyboardInterrupt:
        print("interrupted: nothing saved", file=sys.stderr)
        return 130
    model.save_pretrained(args.out)
    print(f"saved {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
