"""The ``distillm`` command line: ``main(argv) -> int``, called by the console script and by tests.

Exit codes: 0 done; 2 bad input (the message says what to fix); 74 the output could not be written (disk
full, read-only: free space, then rerun the printed command to resume); 75 stopped by SIGTERM/SIGINT after
saving a checkpoint (rerun the printed command to resume). See docs/faults.md.

Each subcommand lives in the module that does its work; that module provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their subcommand runs,
so ``distillm --help`` stays fast. A subcommand registered with ``preset=True`` (its parser has ``--config``
and KEY=VALUE ``overrides``) also gets ``--print-config``: print the resolved configuration and exit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from distillm.allocator import keep_freed_memory
from distillm.environment import launched_processes
from distillm.errors import UserError
from distillm.faults import TrainingStopped, resume_command
from distillm.storage import StorageError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {}
PRESET_COMMANDS: set[str] = set()  # the subcommands that read a preset (--config) and overrides


def _register(name: str, module: str, help: str, preset: bool = False) -> None:
    COMMANDS[name] = (module, help)
    if preset:
        PRESET_COMMANDS.add(name)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillm",
        description="Distil large language models into small ones (DistiLLM, ICML 2024, and its baselines).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported: build its parser fully, the others as stubs.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help, description=help)
        if name == chosen:
            importlib.import_module(module).add_arguments(sub_parser)
            if name in PRESET_COMMANDS:
                sub_parser.add_argument(
                    "--print-config",
                    action="store_true",
                    help="Print the resolved configuration (the preset over its bases, then the overrides) as "
                    "YAML and exit.",
                )
    return parser


def print_config(args: argparse.Namespace) -> int:
    """``--print-config``: the configuration a run would use, resolved and validated, on stdout."""
    from distillm.config import dump_config, load_config  # imports torch (the divergence registry)

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if launched_processes() > 1:
        _exit_before_teardown(code)
    return code


def _exit_before_teardown(code: int) -> None:
    """End a launched process without C++ static destructors: Python's exit handlers, flushed streams, exit.

    torch's gloo process groups can still be referenced (by the engine, the models) when the interpreter
    tears down, and their destruction there sometimes aborts (``terminate called without an active
    exception``, SIGABRT, exit code -6) after a run that finished and saved everything: seen on an AMD EPYC
    Zen 5 in about 1 launch in 12 of a 2-process FSDP script that had called ``destroy_process_group``, and
    in 0 of 30 that ended this way. The launcher would then report a failed run.
    """
    import atexit
    import ctypes

    atexit._run_exitfuncs()  # what interpreter teardown would run first (logging, tensorboard writers, ...)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        ctypes.CDLL(None).fflush(None)  # what C libraries printed (os._exit skips the C library's exit)
    except (OSError, AttributeError, TypeError):
        pass
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    # Before the command's work: freed [tokens x vocab] blocks are reused, not faulted in again (allocator.py).
    keep_freed_memory()
    module = importlib.import_module(COMMANDS[args.command][0])
    # Only the first process of a launch says how to resume; every process exits with the same code.
    first = os.environ.get("RANK", "0") == "0"
    try:
        if getattr(args, "print_config", False):
            return print_config(args)
        return int(module.run(args) or 0)
    except TrainingStopped as stopped:
        if first:
            logging.getLogger("distillm").warning("%s; resume with: %s", stopped, resume_command(argv))
        return stopped.exit_code
    except StorageError as error:
        if first:
            print(f"distillm {args.command}: error: {error}", file=sys.stderr)
            then = "then resume with" if args.command in ("train", "demo") else "then rerun"
            print(f"distillm {args.command}: {then}: {resume_command(argv)}", file=sys.stderr)
        return error.exit_code
    except UserError as error:
        print(f"distillm {args.command}: error: {error}", file=sys.stderr)
        return 2


_register(
    "train",
    "distillm.train",
    "Train a teacher or a student (SFT, KD, SeqKD, ImitKD, GKD, DistiLLM, MiniLLM).",
    preset=True,
)
_register("prepare", "distillm.data.prepare", "Tokenize a dataset, or write the bundled task suite.")
_register(
    "prepare-pretrain",
    "distillm.data.pretrain",
    "Pack a text corpus (files, folders, .gz, a hub dataset) into chunks for the pretraining LM term.",
)
_register("generate", "distillm.seqkd", "Sample responses to a dataset's prompts (SeqKD data).")
_register(
    "evaluate",
    "distillm.evaluate",
    "Sample responses on test sets over several seeds and score them (ROUGE-L).",
)
_register(
    "demo",
    "distillm.demo",
    "Run the whole study offline (data, teacher, every method, evaluation) and write a report.",
)
_register("convert-gguf", "distillm.convert", "Convert a GGUF checkpoint into a Hugging Face model folder.")
_register(
    "init-student",
    "distillm.student_init",
    "Make a student from a model's embeddings, a subset of its layers, its final norm and head.",
)
