"""The monitor's gradient health equals what the training loop itself sees at that step."""

from __future__ import annotations

import math

import pytest
import torch

import layerscope
from layerscope.monitor.gradients import noise_scale
from test_monitor import _Collect as ListSink  # the sink that keeps every record


def test_monitor_gradient_norms_update_ratio_and_noise_scale_equal_direct():
    from nanogpt_model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=64, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sink = ListSink()
    mon = layerscope.Monitor(model, every=3, sinks=[sink], metrics=("frobenius_norm",), when_full="block", drift=False)
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())  # lm_head.weight is tied to transformer.wte.weight: listed once
    grads_at, weights_at, micro = {}, {}, {}
    for step in range(10):
        if model.transformer.wte.weight.grad is not None:
            grads_at[step] = {n: p.grad.double().norm().item() for n, p in params.items()}
        weights_at[step] = {n: p.detach().double().clone() for n, p in params.items()}
        mon.step(step)  # before zero_grad: the gradients of the previous update are still there
        opt.zero_grad(set_to_none=True)
        seen = []
        for k in range(2):  # gradient accumulation: two micro-batches of 4 sequences
            x = torch.randint(0, 64, (4, 17), generator=gen)
            before = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
            _, loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
            (loss / 2).backward()
            mon.observe_micro_batch(4)
            seen.append({n: (p.grad - before[n]).double() for n, p in params.items()})
        micro[step] = seen
        opt.step()
    stats = mon.close()
    assert stats.errors == 0 and stats.gradient_seconds > 0
    records = {r.step: r for r in sink.records}
    assert sorted(records) == [0, 3, 6, 9]
    assert "grad/norm" not in records[0].summary  # no backward had run at step 0
    for s in (3, 6, 9):
        r = records[s]
        table = r.table.set_index("name")
        for name, g in grads_at[s].items():
            if name in table.index:
                assert table.loc[name, "grad_norm"] == pytest.approx(g, rel=1e-5)
                assert table.loc[name, "grad_to_weight"] == pytest.approx(g / weights_at[s][name].norm().item(), rel=1e-5)
        assert r.summary["grad/norm"] == pytest.approx(math.sqrt(sum(v * v for v in grads_at[s].values())), rel=1e-5)
        layer0 = [v for n, v in grads_at[s].items() if ".h.0." in n]
        assert r.summary["grad/norm/layer_0"] == pytest.approx(math.sqrt(sum(v * v for v in layer0)), rel=1e-5)
        # update ratio: one optimizer step, from this snapshot to the next step's weights
        if s + 1 in weights_at:
            for name in table.index:
                w0, w1 = weights_at[s][name], weights_at[s + 1][name]
                assert table.loc[name, "update_ratio"] == pytest.approx(((w1 - w0).norm() / w0.norm()).item(), rel=1e-4)
            assert 1e-5 < r.summary["update/ratio/median"] < 1
        else:
            assert "update_ratio" not in table.columns  # the last snapshot has no next step
        # noise scale: micro-batches (4) vs accumulated (8), averaged over the updates since the last record
        small = big = 0.0
        for it in range(s - 3, s):
            xs = micro[it]
            small += sum(sum(float((x[n] ** 2).sum()) for n in x) for x in xs) / 2
            big += sum(float(((xs[0][n] + xs[1][n]) / 2).pow(2).sum()) for n in xs[0])
        g2, S, b = noise_scale(small / 3, big / 3, 4, 8)
        assert r.summary["noise/steps"] == 3
        assert r.summary["noise/G2"] == pytest.approx(g2, rel=1e-4)
        assert r.summary["noise/S"] == pytest.approx(S, rel=1e-4)
        if math.isfinite(b):
            assert r.summary["noise/B_simple"] == pytest.approx(b, rel=1e-4)


def test_gradients_reach_every_sink(tmp_path):
    """JSONL, store and TensorBoard get the gradient columns and summary keys like any other metric."""
    import json

    from layerscope.monitor import load_run

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = tmp_path / "m.sqlite"
    mon = layerscope.Monitor(model, every=2, sinks=[f"jsonl:{tmp_path / 'm.jsonl'}", f"store:{store}",
                                                    f"tensorboard:{tmp_path / 'tb'}", "console"],
                             metrics=("frobenius_norm",), when_full="block", run="g")
    for step in range(5):
        mon.step(step)
        opt.zero_grad()
        model(torch.randn(8, 8)).pow(2).mean().backward()
        opt.step()
    stats = mon.close()
    assert stats.sink_errors == 0
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert "grad/norm" in lines[1]["summary"] and "update/ratio/median" in lines[1]["summary"]
    assert "grad_norm" in lines[1]["matrices"][0]
    assert load_run("g", store)["grad_norm"].notna().any()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "layerscope/grad/norm" in acc.Tags()["scalars"]
