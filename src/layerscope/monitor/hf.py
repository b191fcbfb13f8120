"""The monitor as a Hugging Face ``transformers.TrainerCallback``.

    trainer = Trainer(..., callbacks=[LayerscopeCallback(every=100, sinks=["console", "jsonl:ls.jsonl"])])
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .core import Monitor


class LayerscopeCallback(TrainerCallback):
    """Snapshots every ``every`` optimizer steps (default: the Trainer's ``logging_steps``); other
    keyword arguments go to :class:`Monitor`. Only the main process analyses."""

    def __init__(self, every: int | None = None, **monitor_kwargs: Any):
        self.every = every
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None and self.monitor is None:
            every = self.every or max(1, int(args.logging_steps))
            self.monitor = Monitor(model, every=every, **self.monitor_kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # the Trainer zeroes the gradients before on_step_end: read them here (global_step is the
        # number of updates done; this one will be global_step + 1)
        if self.monitor is not None:
            self.monitor.observe_gradients(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
