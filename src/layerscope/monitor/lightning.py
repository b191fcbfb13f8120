"""The monitor as a PyTorch Lightning ``Callback`` (``lightning`` or ``pytorch_lightning``).

    trainer = L.Trainer(callbacks=[LayerscopeLightningCallback(every=100)])
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback

from .core import Monitor


class LayerscopeLightningCallback(Callback):
    """Snapshots the LightningModule every ``every`` optimizer steps; other keyword arguments go
    to :class:`Monitor`. Only global rank 0 analyses."""

    def __init__(self, every: int = 100, **monitor_kwargs: Any):
        self.every = every
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero and self.monitor is None:
            self.monitor = Monitor(pl_module, every=self.every, **self.monitor_kwargs)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # gradients exist here (after clipping); global_step counts the updates done so far
        if self.monitor is not None:
            self.monitor.observe_gradients(trainer.global_step + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor is not None:
            self.monitor.step(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        if self.monitor is not None:
            self.monitor.close()
