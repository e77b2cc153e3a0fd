"""Which training loop ``distillm train`` runs: ``loop: tokens`` (``distillm.train``) or ``loop: minillm``
(``distillm.minillm``). Both take a validated ``Config`` and return a ``TrainResult``; ``distillm train``
(``train.run``) calls :func:`run_training`."""

from __future__ import annotations

from distillm.config import Config


def run_training(config: Config):
    """Train with the loop ``config.loop`` names."""
    # Imported here, not at the top: train.py imports this module, and minillm.py imports train.py.
    if config.loop == "minillm":
        from distillm.minillm import train

        return train(config)
    from distillm.train import train

    return train(config)
