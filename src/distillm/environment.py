"""What the process's environment says to distillm: its own on/off switches, and a launcher's world size."""

from __future__ import annotations

import logging
import os


def switched_on(name: str, stays_on: str, logger: logging.Logger) -> bool:
    """An on/off switch that is on by default: ``name=0`` turns it off; unset, empty or ``1`` leave it on.

    Any other value is named in a warning on the caller's ``logger`` (``stays_on`` says what remains on) and
    leaves it on.
    """
    switch = os.environ.get(name, "1")
    if switch == "0":
        return False
    if switch not in ("1", ""):
        logger.warning("%s=%r is neither 0 (off) nor 1 (on): %s", name, switch, stays_on)
    return True


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate, DeepSpeed) started: ``WORLD_SIZE``, else 1."""
    world_size = os.environ.get("WORLD_SIZE", "1").strip()
    return int(world_size) if world_size.isdigit() else 1
