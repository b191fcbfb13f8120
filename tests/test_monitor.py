"""The training monitor on real training runs: every sink gets every scheduled step, and nothing
inside the monitor (a failing metric or sink, a full queue, a stuck or dead worker, low memory)
reaches the training loop."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import layerscope
from layerscope.errors import LayerscopeError
from layerscope.weights.metrics import registry
from layerscope.monitor import ConsoleSink, JSONLSink, StoreSink, TensorBoardSink, load_run
from nanogpt_model import GPT, GPTConfig
from conftest import require

MODEL_ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=64, dropout=0.0)


def _train(model: torch.nn.Module, steps: int, monitor=None, seed: int = 0) -> list[float]:
    """Really train ``model`` on a learnable sequence task (next token = token + 1 mod V)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps + 1):
        if monitor is not None:
            monitor.step(step)
        if step == steps:
            break
        start = torch.randint(0, MODEL_ARGS["vocab_size"], (8, 1), generator=gen)
        seq = (start + torch.arange(MODEL_ARGS["block_size"] + 1)) % MODEL_ARGS["vocab_size"]
        _, loss = model(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**MODEL_ARGS))


class _Collect:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def close(self):
        pass


def test_every_sink_gets_every_scheduled_step(tmp_path):
    console = io.StringIO()
    collect = _Collect()
    sinks = [ConsoleSink(console), JSONLSink(tmp_path / "m.jsonl"), StoreSink(tmp_path / "store.sqlite"),
             TensorBoardSink(tmp_path / "tb"), collect]
    model = _gpt()
    monitor = layerscope.Monitor(model, every=10, sinks=sinks, run="unit", when_full="block")
    losses = _train(model, 40, monitor)
    stats = monitor.close()
    assert losses[-1] < 0.5 * losses[0]  # it really trained
    steps = [0, 10, 20, 30, 40]
    assert stats.analysed == 5 and stats.errors == stats.sink_errors == stats.skipped_full == 0
    assert [r.step for r in collect.records] == steps
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == steps
    assert sorted(load_run("unit", tmp_path / "store.sqlite")["step"].unique()) == steps
    printed = console.getvalue().splitlines()
    assert [int(line.split()[2].rstrip(":")) for line in printed] == steps and "entropy_rank" in printed[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    assert [e.step for e in acc.Scalars("layerscope/stable_rank/mean")] == steps
    hist = acc.Histograms("layerscope/weights/transformer.h.0.mlp.c_fc.weight")
    assert [h.step for h in hist] == steps and hist[0].histogram_value.num == 4 * 32 * 32

    # the records hold what layerscope.analyze reports for the same weights, and real drift
    last = collect.records[-1]
    direct = layerscope.analyze(model, metrics="stable_rank").table.set_index("name")
    for row in last.table.itertuples():
        assert row.stable_rank == pytest.approx(direct.at[row.name, "stable_rank"], rel=1e-9)
    assert "lm_head.weight" not in set(last.table["name"])  # tied to wte: analysed once
    drifts = [r.summary.get("drift/from_first") for r in collect.records]
    assert np.isnan(drifts[0]) and 0 < drifts[1] < drifts[-1]


def test_drift_matches_a_direct_computation():
    model = _gpt(1)
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    collect = _Collect()
    monitor = layerscope.Monitor(model, every=5, sinks=[collect], when_full="block", metrics=["frobenius_norm"])
    _train(model, 5, monitor)
    monitor.close()
    row = collect.records[-1].table.set_index("name").loc["transformer.h.1.mlp.c_proj.weight"]
    after = dict(model.named_parameters())["transformer.h.1.mlp.c_proj.weight"].detach().double()
    before = first["transformer.h.1.mlp.c_proj.weight"].double()
    assert row["drift_first"] == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-10)


def test_a_metric_that_raises_and_a_sink_that_raises_do_not_stop_anything():
    @registry.register("explodes", needs="moments", group="test")
    def _explodes(mom):
        raise RuntimeError("boom")

    class Broken:
        def write(self, record):
            raise ValueError("sink broke")

        def close(self):
            raise ValueError("close broke")

    try:
        collect = _Collect()
        model = _gpt()
        monitor = layerscope.Monitor(model, every=5, metrics=["stable_rank", "explodes"],
                                     sinks=[Broken(), collect], when_full="block")
        _train(model, 10, monitor)
        stats = monitor.close()
    finally:
        registry._REGISTRATIONS[:] = [r for r in registry._REGISTRATIONS if r.name != "explodes"]
    assert [r.step for r in collect.records] == [0, 5, 10]
    table = collect.records[0].table
    assert table["stable_rank"].notna().all() and table["explodes"].isna().all()
    assert table["error"].str.contains("explodes failed: RuntimeError: boom").all()
    assert stats.sink_errors == 3 + 1  # three writes and the close


def test_a_full_queue_skips_and_counts_without_blocking_training():
    release = threading.Event()

    class Slow(_Collect):
        def write(self, record):
            release.wait(30)
            super().write(record)

    slow = Slow()
    model = _gpt()
    monitor = layerscope.Monitor(model, every=1, sinks=[slow], queue_size=1)
    started = time.perf_counter()
    _train(model, 20, monitor)
    trained_in = time.perf_counter() - started
    assert monitor.stats.skipped_full >= 15  # the worker is stuck on the first record
    assert monitor.stats.blocked_seconds < trained_in / 2
    release.set()
    stats = monitor.close(timeout=30)
    assert stats.analysed == stats.submitted == 21 - stats.skipped_full
    assert [r.step for r in slow.records] == sorted(r.step for r in slow.records)


def test_close_returns_when_the_analysis_is_stuck():
    never = threading.Event()

    class Stuck(_Collect):
        def write(self, record):
            never.wait(60)

    model = _gpt()
    monitor = layerscope.Monitor(model, every=1, sinks=[Stuck()])
    monitor.submit(0)
    started = time.perf_counter()
    monitor.close(timeout=1.0)
    assert time.perf_counter() - started < 5
    never.set()


def test_a_dead_worker_is_noticed_and_never_blocks(monkeypatch):
    model = _gpt()
    monitor = layerscope.Monitor(model, every=1, sinks=[_Collect()], when_full="block")

    def crash(snapshot):
        raise KeyboardInterrupt  # not an Exception: kills the thread (and pytest would see a SystemExit)

    monkeypatch.setattr(monitor, "_analyse", crash)
    monitor.submit(0)
    monitor._worker.join(10)
    assert not monitor._worker.is_alive()
    started = time.perf_counter()
    assert monitor.submit(1) is False and monitor.submit(2) is False
    assert time.perf_counter() - started < 5
    monitor.close(timeout=1)


def test_memory_guard_skips_snapshots():
    collect = _Collect()
    model = _gpt()
    monitor = layerscope.Monitor(model, every=1, sinks=[collect], memory_limit=1e-6)
    _train(model, 3, monitor)
    stats = monitor.close()
    assert stats.skipped_memory == 4 and stats.submitted == 0 and not collect.records


def test_wrappers_are_unwrapped():
    model = _gpt()
    compiled = torch.compile(model)  # lazily compiled: wrapping costs nothing until called
    collect = _Collect()
    monitor = layerscope.Monitor(compiled, every=1, sinks=[collect], metrics=["stable_rank"])
    monitor.submit(7)
    monitor.close()
    names = set(collect.records[0].table["name"])
    assert "transformer.wte.weight" in names and not any("_orig_mod" in n for n in names)


def test_bad_arguments_are_one_clear_error():
    model = _gpt()
    with pytest.raises(LayerscopeError, match="every"):
        layerscope.Monitor(model, every=0)
    with pytest.raises(LayerscopeError, match="unknown metric"):
        layerscope.Monitor(model, metrics=["no_such_metric"])
    with pytest.raises(LayerscopeError, match="unknown sink"):
        layerscope.Monitor(model, sinks=["carrier-pigeon"])


def test_the_training_example_runs_with_the_monitor(trained_run):
    history = trained_run["history"]
    assert history[-1]["val"] < history[0]["val"] - 1.0  # loss falls (from ln 256 ≈ 5.5)
    lines = [json.loads(x) for x in (trained_run["dir"] / "monitor.jsonl").read_text().splitlines()]
    every, max_iters = trained_run["settings"]["monitor_every"], trained_run["settings"]["max_iters"]
    assert [x["step"] for x in lines] == list(range(0, max_iters + 1, every))
    assert trained_run["monitor"].errors == 0
    drift = [x["summary"]["drift/from_first"] for x in lines]
    assert drift[0] is None and drift[-1] > drift[1] > 0
    stored = load_run(lines[0]["run"], trained_run["dir"] / "monitor.sqlite")
    assert sorted(stored["step"].unique()) == [x["step"] for x in lines]


def test_hf_trainer_callback_in_a_real_trainer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from layerscope.monitor.hf import LayerscopeCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (24, 16), generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                             logging_steps=2, save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True)
    callback = LayerscopeCallback(sinks=[f"jsonl:{tmp_path / 'hf.jsonl'}"], when_full="block")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    lines = [json.loads(x) for x in (tmp_path / "hf.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6]  # every logging_steps
    assert callback.monitor.stats.errors == 0 and any(m["role"] == "attn.qkv" for m in lines[0]["matrices"])
    # the Trainer's checkpoint-<step> folders are a trajectory
    traj = layerscope.trajectory([tmp_path / "out"])
    assert [c.step for c in traj.checkpoints] == [3, 6]


def test_lightning_callback_in_a_real_trainer(tmp_path):
    lightning = require("lightning")
    from layerscope.monitor.lightning import LayerscopeLightningCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = _gpt()

        def training_step(self, batch, batch_idx):
            return self.gpt(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())[1]

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.randint(0, 64, (32, 17), generator=gen), batch_size=4)
    collect = _Collect()
    callback = LayerscopeLightningCallback(every=2, sinks=[collect], when_full="block")
    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(Module(), loader)
    assert [r.step for r in collect.records] == [2, 4]
    assert "gpt.transformer.wte.weight" in set(collect.records[0].table["name"])


def test_wandb_sink_logs_against_the_training_step(tmp_path, monkeypatch):
    wandb = require("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="layerscope-test", dir=str(tmp_path), mode="offline")
    try:
        model = _gpt()
        monitor = layerscope.Monitor(model, every=5, sinks=["wandb"], when_full="block")
        for step in range(11):
            run.log({"train/loss": 1.0 / (step + 1)}, step=step)  # the loop logs ahead of the monitor
            monitor.step(step)
        stats = monitor.close()
        summary = dict(run.summary)
    finally:
        run.finish()
    assert stats.sink_errors == 0 and stats.analysed == 3
    assert summary["layerscope/step"] == 10  # last record, not dropped as an out-of-order step
    assert summary["layerscope/entropy_rank/mean"] > 0
    assert "layerscope/mlp.up/stable_rank/layer_1" in summary


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _gpt()
        monitor = layerscope.Monitor(model, every=2, sinks=[f"jsonl:{out_dir}/rank{rank}.jsonl"], when_full="block")
        _train(model, 4, monitor)
        stats = monitor.close()
        (Path(out_dir) / f"rank{rank}.stats").write_text(f"{int(monitor.active)} {stats.analysed}")
    finally:
        dist.destroy_process_group()


def test_only_rank_zero_analyses_in_a_distributed_run(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.stats").read_text() == "1 3"
    assert (tmp_path / "rank1.stats").read_text() == "0 0"
    assert len((tmp_path / "rank0.jsonl").read_text().splitlines()) == 3 and not (tmp_path / "rank1.jsonl").exists()


def test_the_monitor_leaves_the_training_threads_alone():
    before = torch.get_num_threads()
    model = _gpt()
    monitor = layerscope.Monitor(model, every=1, sinks=[_Collect()], when_full="block")
    _train(model, 2, monitor)
    monitor.close()
    assert torch.get_num_threads() == before


def test_analysis_runs_niced_with_one_torch_and_one_blas_thread():
    """README: the background analysis runs at nice 10 with one torch and one BLAS thread. Observed from
    inside it: a metric (called by the analysis) and a sink (called by the worker) record what they see."""
    import os

    from threadpoolctl import threadpool_info

    seen: list[tuple[int, int, list[int]]] = []
    in_sink: list[tuple[int, int, list[int]]] = []

    def observe() -> tuple[int, int, list[int]]:
        blas = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), torch.get_num_threads(), blas

    @registry.register("observe_threads", needs="moments", group="test")
    def _observe(mom):
        seen.append(observe())
        return 0.0

    class Sink:
        def write(self, record):
            in_sink.append(observe())

        def close(self):
            pass

    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    try:
        model = _gpt()
        monitor = layerscope.Monitor(model, every=5, metrics=["observe_threads"], sinks=[Sink()], when_full="block")
        _train(model, 5, monitor)
        monitor.close()
    finally:
        registry._REGISTRATIONS[:] = [r for r in registry._REGISTRATIONS if r.name != "observe_threads"]
    assert seen and len(in_sink) == 2 and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice
    assert all(nice == min(main_nice + 10, 19) for nice, _, _ in seen + in_sink), (seen, in_sink)
    assert all(threads == 1 for _, threads, _ in seen + in_sink), (seen, in_sink)
    assert all(blas and all(n == 1 for n in blas) for _, _, blas in seen), seen  # sinks run outside the BLAS limit
