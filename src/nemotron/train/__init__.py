"""Pretraining: the Trainer, one step's pieces, optimiser + schedule, balancing, checkpoints,
metrics.

`pretrain(cfg, job_dir) -> TrainSummary` is imported lazily, so importing the typed configs of
this package (as `nemotron.config` does) does not pull in the model and torch.distributed.
"""

__all__ = ["pretrain", "Trainer", "TrainSummary", "NonFiniteLossError", "InitializationError"]


def __getattr__(name: str):
    if name in __all__:
        from nemotron.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'nemotron.train' has no attribute {name!r}")
