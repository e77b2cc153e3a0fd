"""distillm.cli: how a launched process (one of several) ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# A child that registers an exit handler and runs a command that fails at once on its input (exit code 2).
CHILD = textwrap.dedent(
    """
    import atexit, sys
    atexit.register(lambda: print("exit handler ran", flush=True))
    from distillm.cli import main
    code = main(["convert-gguf", sys.argv[1], "--out", sys.argv[2]])
    print("main returned", code, flush=True)
    """
)


def run_child(tmp_path, world_size: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORLD_SIZE": world_size, "DISTILLM_KEEP_FREED_MEMORY": "0"}
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "missing.gguf"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_one_of_several_processes_ends_with_its_code_after_the_exit_handlers_and_skips_the_teardown(tmp_path):
    done = run_child(tmp_path, "2")
    assert done.returncode == 2, done.stderr
    assert "exit handler ran" in done.stdout  # Python's exit handlers ran ...
    assert "main returned" not in done.stdout  # ... and the process ended inside main, before teardown
    assert "missing.gguf" in done.stderr  # the command's own error message was flushed out


def test_a_single_process_returns_from_main_as_usual(tmp_path):
    done = run_child(tmp_path, "1")
    assert done.returncode == 0, done.stderr  # the child script itself ends normally
    assert "main returned 2" in done.stdout and "exit handler ran" in done.stdout
