"""The ``distillm`` command line: ``main(argv) -> int``, called by the console script and by tests.

Exit codes: 0 done; 2 bad input (the message says what to fix); 74 the output could not be written (disk
full, read-only: free space, then rerun the printed command to resume); 75 stopped by SIGTERM/SIGINT after
saving a checkpoint (rerun the printed command to resume). See docs/faults.md.

Each subcommand lives in the module that does its work; that module provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their subcommand runs,
so ``distillm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from distillm.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {}


def _register(name: str, module: str, help: str) -> None:
    COMMANDS[name] = (module, help)


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
    module = importlib.import_module(COMMANDS[args.command][0])
    from distillm.faults import TrainingStopped, resume_command
    from distillm.storage import StorageError

    # Only the first process of a launch says how to resume; every process exits with the same code.
    first = os.environ.get("RANK", "0") == "0"
    try:
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
    "distillm.loops",
    "Train a teacher or a student (SFT, KD, SeqKD, ImitKD, GKD, DistiLLM, MiniLLM).",
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
