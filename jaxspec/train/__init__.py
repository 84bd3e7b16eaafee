"""Training: one subsystem for every trainer (hidden-transfer heads, LUD, image-token models).

    cfg = TrainConfig(steps=2000, batch_size=16, lr=1e-3)
    params, log = train(loss_fn, params, frozen, data, cfg, workdir="runs/heads")

`loss_fn(trainable, frozen, batch) -> (loss, metrics)`; one jitted step (optax: adamw, warmup +
cosine, global-norm clipping); orbax CheckpointManager (trainable + optimizer state + step; the
data position is the step, batches being a pure function of it); resume after an interruption
reproduces the uninterrupted run; progress bar, eval split, JSON log and a curve PNG.
"""

from jaxspec.train.data import ArrayDataset
from jaxspec.train.trainer import TrainConfig, make_optimizer, train

__all__ = ["ArrayDataset", "TrainConfig", "make_optimizer", "train"]
