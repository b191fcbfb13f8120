"""layerscope on a real Ray cluster: two worker processes on this machine, the trained nanoGPT's
checkpoints and a sharded checkpoint, checked row for row (and store row for store row) against
the single-process run; a worker killed mid-run; a re-run that submits nothing; Ctrl-C cancelling.

One cluster for the module (ray.init with 2 CPUs: two worker processes), shut down at the end
and checked to leave no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

ray = pytest.importorskip("ray")

import checkpoints  # noqa: E402
import layerscope  # noqa: E402
from layerscope.change.trajectory import trajectory  # noqa: E402
from layerscope.cli import main  # noqa: E402
from layerscope.executor import open_executor  # noqa: E402
from layerscope.store import Store  # noqa: E402

TASK_PROCESS = "ray::layerscope_task"  # Ray names a worker process after the task it is running


def _ray_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith(("ray::", "raylet", "gcs_server")) or "ray" in " ".join(p.cmdline()[:3]):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with two CPUs, hence two worker processes; nothing left running afterwards."""
    import layerscope.executor as executor

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield open_executor("ray")
    finally:
        executor._OPEN.clear()
        ray.shutdown()
        deadline = time.time() + 15
        while _ray_processes() and time.time() < deadline:
            time.sleep(0.2)
        left = _ray_processes()
        for p in left:
            p.kill()
        assert not left, f"Ray left processes running: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def six_checkpoints(tmp_path_factory) -> Path:
    """examples/train_gpt.py really trained for 200 steps with a checkpoint every 40: six checkpoints."""
    import train_gpt

    out = tmp_path_factory.mktemp("six-checkpoints")
    settings = dict(max_iters=200, eval_interval=40, monitor_every=1000, n_layer=2, n_head=4, n_embd=64,
                    batch_size=8, block_size=64, corpus_bytes=400_000, eval_iters=2, warmup_iters=20,
                    out_dir=str(out), quiet=True, sinks="")
    saved = {k: getattr(train_gpt, k) for k in settings}
    train_gpt.configure([f"--{k}={v}" for k, v in settings.items()])
    try:
        result = train_gpt.train()
    finally:
        for k, v in saved.items():
            setattr(train_gpt, k, v)
    assert len(result["checkpoints"]) == 6
    return out


@pytest.fixture(scope="module")
def reference(six_checkpoints, tmp_path_factory):
    """The single-process trajectory (Procrustes included), and its store's contents."""
    store = tmp_path_factory.mktemp("reference") / "store.sqlite"
    result = trajectory([six_checkpoints], store=str(store), procrustes=True)
    return result, _contents(store)


def _contents(path) -> dict[str, set]:
    with Store(path) as store:
        return {t: set(rows) for t, rows in store.dump().items()}


def test_trajectory_on_ray_equals_single_process_and_reruns_submit_nothing(cluster, reference, six_checkpoints, tmp_path):
    expected, expected_store = reference
    store = tmp_path / "store.sqlite"
    seen = []
    before = cluster.submitted
    result = trajectory([six_checkpoints], store=str(store), procrustes=True, cluster="ray",
                        progress=lambda *a: seen.append(a))
    pd.testing.assert_frame_equal(result.table, expected.table, check_exact=True)
    # computed vs cached may split differently: identical tensors (a tied head, all-ones norms) in
    # flight at once are both computed, on two workers as on two threads of one process
    assert result.computed + result.cached == expected.computed + expected.cached
    assert _contents(store) == expected_store  # same keys, same values, written by the driver alone
    assert cluster.submitted - before == 6  # one task per checkpoint
    assert seen[-1][:3] == ("checkpoints", 6, 6)

    counts = Store(store).counts()
    before = cluster.submitted
    again = trajectory([six_checkpoints], store=str(store), procrustes=True, cluster="ray")
    assert cluster.submitted == before  # the driver found everything stored: nothing submitted
    assert again.computed == 0 and again.cached == expected.computed + expected.cached
    assert Store(store).counts() == counts
    pd.testing.assert_frame_equal(again.table, expected.table, check_exact=True)


def test_analyze_of_a_sharded_checkpoint_on_ray(cluster, tmp_path):
    folder = checkpoints.build_hf("phi3", tmp_path / "phi3", fmt="sharded")  # fused qkv and gate_up: slices too
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    single = layerscope.analyze(folder, store=str(tmp_path / "a.sqlite"))
    before = cluster.submitted
    distributed = layerscope.analyze(folder, store=str(tmp_path / "b.sqlite"), cluster="ray")
    assert cluster.submitted > before
    pd.testing.assert_frame_equal(distributed.table, single.table, check_exact=True)
    assert distributed.computed + distributed.cached == single.computed + single.cached
    assert _contents(tmp_path / "b.sqlite") == _contents(tmp_path / "a.sqlite")
    assert distributed.anatomy.tied_embeddings == single.anatomy.tied_embeddings

    before = cluster.submitted
    again = layerscope.analyze(folder, store=str(tmp_path / "b.sqlite"), cluster="ray")
    assert cluster.submitted == before and again.computed == 0
    pd.testing.assert_frame_equal(again.table, single.table, check_exact=True)


def test_compare_on_ray_equals_single_process(cluster, six_checkpoints, tmp_path):
    first, last = sorted(six_checkpoints.glob("ckpt_*.pt"))[::5]
    single = layerscope.compare(first, last, store=str(tmp_path / "a.sqlite"))
    before = cluster.submitted
    distributed = layerscope.compare(first, last, store=str(tmp_path / "b.sqlite"), cluster="ray")
    assert cluster.submitted > before  # the spectral analysis of both models ran on the cluster
    pd.testing.assert_frame_equal(distributed.table, single.table, check_exact=True)
    assert distributed.tokens == single.tokens


def test_bad_input_and_in_memory_weights_on_ray(cluster, six_checkpoints, tmp_path):
    """Tensors that cannot be analysed (NaN, Inf, integer, empty, 1×n) are rows with their error,
    as on one machine; a state dict the driver holds travels through Ray's object store."""
    bad = checkpoints.write_troubled_safetensors(tmp_path / "troubled.safetensors")
    single = layerscope.analyze(bad, store=str(tmp_path / "a.sqlite"))
    distributed = layerscope.analyze(bad, store=str(tmp_path / "b.sqlite"), cluster="ray")
    assert (single.table["error"] != "").sum() >= 5
    pd.testing.assert_frame_equal(distributed.table, single.table, check_exact=True)

    state = torch.load(sorted(six_checkpoints.glob("ckpt_*.pt"))[-1], weights_only=True)["model"]
    single = layerscope.analyze(state, store=str(tmp_path / "c.sqlite"))
    distributed = layerscope.analyze(state, store=str(tmp_path / "d.sqlite"), cluster="ray")
    pd.testing.assert_frame_equal(distributed.table, single.table, check_exact=True)


def test_a_worker_killed_mid_task_is_retried(cluster, reference, six_checkpoints, tmp_path):
    expected, expected_store = reference
    killed: list[int] = []
    stop = threading.Event()

    def kill_first_busy_worker() -> None:
        while not stop.is_set() and not killed:
            for p in _children():
                try:
                    if p.name() == TASK_PROCESS:
                        p.kill()  # SIGKILL, mid-task
                        killed.append(p.pid)
                        return
                except psutil.Error:
                    pass
            time.sleep(0.005)

    killer = threading.Thread(target=kill_first_busy_worker, daemon=True)
    killer.start()
    try:
        result = trajectory([six_checkpoints], store=str(tmp_path / "store.sqlite"), procrustes=True, cluster="ray")
    finally:
        stop.set()
        killer.join()
    assert killed, "no task was caught running"
    pd.testing.assert_frame_equal(result.table, expected.table, check_exact=True)  # every row, same values
    assert _contents(tmp_path / "store.sqlite") == expected_store


def test_stopping_the_driver_cancels_tasks_in_flight(cluster):
    """What Ctrl-C does: the map is left with tasks running, and they are cancelled (killed)."""
    results = cluster.map(time.sleep, [0, 60, 60, 60])
    first = next(results)
    assert first.item == 0
    # both workers busy (a task cancelled while Ray is still starting its worker process can slip through)
    deadline = time.time() + 30
    while _busy() < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert _busy() == 2
    started = time.time()
    results.close()  # what KeyboardInterrupt inside the loop does too
    while _busy() and time.time() - started < 20:
        time.sleep(0.05)
    left = [(p.pid, p.status(), time.time() - p.create_time()) for p in _children() if p.name() == TASK_PROCESS]
    assert not left, left
    assert time.time() - started < 20  # not the 60 s the tasks would have slept


def _busy() -> int:
    """Worker processes running one of our tasks now."""
    busy = 0
    for p in _children():
        try:
            busy += p.name() == TASK_PROCESS
        except psutil.Error:
            pass
    return busy


def _children() -> list[psutil.Process]:
    """Live descendants (a killed worker may linger as a zombie under its task's name)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                p.name()
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_without_cluster_ray_is_never_imported(tmp_path):
    path = checkpoints.save_safetensors({"w.weight": torch.randn(32, 16)}, tmp_path / "m.safetensors")
    code = ("import sys; from layerscope.cli import main; "
            f"rc = main(['analyze', {str(path)!r}, '--quiet', '--store', {str(tmp_path / 's.sqlite')!r}]); "
            "assert rc == 0, rc; assert 'ray' not in sys.modules, 'ray was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr


def test_a_bad_cluster_address_is_one_line_and_exit_2(tmp_path, capsys):
    path = checkpoints.save_safetensors({"w.weight": torch.randn(32, 16)}, tmp_path / "m.safetensors")
    assert main(["analyze", str(path), "--cluster", "spark://x", "--store", str(tmp_path / "s.sqlite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ray://HOST:PORT" in err[0]
