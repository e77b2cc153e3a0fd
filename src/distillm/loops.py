"""Which training loop ``distillm train`` runs: ``loop: tokens`` (``distillm.train``) or ``loop: minillm``
(``distillm.minillm``). Both take a validated ``Config`` and return a ``TrainResult``."""

from __future__ import annotations

import logging

from distillm.config import Config

logger = logging.getLogger(__name__)


def run_training(config: Config):
    """Train with the loop ``config.loop`` names."""
    if config.loop == "minillm":
        from distillm.minillm import train

        return train(config)
    from distillm.train import train

    return train(config)


def add_arguments(parser) -> None:
    from distillm.train import add_arguments as train_arguments

    train_arguments(parser)


def run(args) -> int:
    from distillm.checkpoint import list_checkpoints
    from distillm.config import load_config
    from distillm.errors import UserError

    config = load_config(args.config, args.overrides)
    if args.resume:
        if not config.train.resume:
            raise UserError("--resume contradicts train.resume=false")
        if not list_checkpoints(config.train.output_dir):
            raise UserError(
                f"--resume: no checkpoint in {config.train.output_dir}/checkpoints to resume from"
            )
    result = run_training(config)
    logger.info(
        "done: %d steps in %s (best %s at step %s)",
        result.steps,
        result.output_dir,
        result.best_metric,
        result.best_step,
    )
    return 0
