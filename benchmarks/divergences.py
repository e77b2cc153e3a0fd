"""Forward + backward time and memory of each divergence: closed-form student gradient against autograd.

For every divergence of `distillm.losses.divergences`, two ways to compute the value and its gradient
w.r.t. the student's logits, on the same fp32 CPU logits `[N, V]` (the teacher's without grad):

- `new`: the public function (`forward_kl`, ...): a `torch.autograd.Function` that computes the gradient in
  closed form in the forward pass and saves it alone;
- `ref`: the private `_reference_*` function, autograd through the definition (what the public functions
  were before, and what they still fall back to when the teacher needs a gradient).

Time: each round runs `--iters` forward + backward (`value.sum().backward()`) of every variant in turn, so
background load hits both alike; the table gives the median over `--repeats` rounds of the per-call time.
Memory, measured once per variant after the timing: `saved` is what autograd keeps between forward and
backward beyond the inputs (the tensors packed for backward, by `saved_tensors_hooks`, counted once per
storage); `peak` is the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) during
one forward + backward after a warm-up, above the resident set before it, in a child process per variant
with glibc's mmap threshold fixed at 1 MiB, so that freed tensors leave the resident set and the peak
follows live tensors (not in the timing process: there, every allocation would become a fresh mmap and its
page faults would dominate the times).

    python benchmarks/divergences.py                      # N x V = 1024 x 1024 and 512 x 50257
    python benchmarks/divergences.py --shapes 256x8192 --repeats 9 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch

from distillm.losses import divergences as div

VARIANTS = {  # name -> (new, ref)
    "forward_kl": (div.forward_kl, div._reference_forward_kl),
    "reverse_kl": (div.reverse_kl, div._reference_reverse_kl),
    "skew_forward_kl": (
        partial(div.skew_forward_kl, alpha=0.1),
        partial(div._reference_skew_forward_kl, alpha=0.1),
    ),
    "skew_reverse_kl": (
        partial(div.skew_reverse_kl, alpha=0.1),
        partial(div._reference_skew_reverse_kl, alpha=0.1),
    ),
    "generalized_jsd": (
        partial(div.generalized_jsd, beta=0.5),
        partial(div._reference_generalized_jsd, beta=0.5),
    ),
    "total_variation": (div.total_variation, div._reference_total_variation),
}
MIB = 1 << 20


def forward_backward(fn, student: torch.Tensor, teacher: torch.Tensor) -> None:
    fn(student, teacher).sum().backward()
    student.grad = None


def seconds_per_call(fn, student: torch.Tensor, teacher: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        forward_backward(fn, student, teacher)
    return (time.perf_counter() - start) / iters


def saved_bytes(fn, student: torch.Tensor, teacher: torch.Tensor) -> int:
    """Bytes autograd keeps for backward beyond the inputs, each storage counted once."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor is not student and tensor is not teacher:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = fn(student, teacher)
    del value
    return sum(storages.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn, student: torch.Tensor, teacher: torch.Tensor) -> int | None:
    """Resident-set high-water mark of one forward + backward above the resident set before it."""
    forward_backward(fn, student, teacher)  # warm-up
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    forward_backward(fn, student, teacher)
    return (_status_kib("VmHWM") - before) * 1024


def _inputs(n: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = (2 * torch.randn(n, v, generator=generator)).requires_grad_()  # [N, V]
    teacher = 2 * torch.randn(n, v, generator=generator)  # [N, V]
    return student, teacher


def peak_in_child(n: int, v: int, name: str, label: str, threads: int) -> int | None:
    command = [sys.executable, __file__, "--peak-worker", f"{n}x{v}", name, label, "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "512x50257"], help="N x V of the logits")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; medians reported")
    parser.add_argument(
        "--iters", type=int, default=0, help="calls per variant per round (0: enough for ~50 ms)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--divergences", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--peak-worker", nargs=3, help=argparse.SUPPRESS)  # N x V, divergence, new|ref
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_worker:
        shape_text, name, label = args.peak_worker
        fn = VARIANTS[name][0 if label == "new" else 1]
        print(json.dumps(peak_bytes(fn, *_inputs(*(int(x) for x in shape_text.split("x"))))))
        return 0

    print(
        f"torch {torch.__version__}, fp32 CPU, {torch.get_num_threads()} threads, median of {args.repeats} "
        f"alternating rounds, load average {os.getloadavg()[0]:.2f} at the start"
    )
    print()
    print(
        "| N x V | divergence | ref ms | new ms | ref / new | ref saved MiB | new saved MiB | "
        "ref peak MiB | new peak MiB | ref / new peak |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape_text in args.shapes:
        n, v = (int(x) for x in shape_text.split("x"))
        student, teacher = _inputs(n, v)
        for name in args.divergences:
            new, ref = VARIANTS[name]
            for fn in (new, ref):  # warm-up: allocator, first-call dispatch
                forward_backward(fn, student, teacher)
            iters = args.iters or max(1, round(0.05 / seconds_per_call(ref, student, teacher, 1)))
            seconds: dict[str, list[float]] = {"new": [], "ref": []}
            for _ in range(args.repeats):
                for label, fn in (("new", new), ("ref", ref)):
                    seconds[label].append(seconds_per_call(fn, student, teacher, iters))
            ms = {label: statistics.median(values) * 1e3 for label, values in seconds.items()}
            saved = {
                label: saved_bytes(fn, student, teacher) / MIB for label, fn in (("new", new), ("ref", ref))
            }
            peak = {label: peak_in_child(n, v, name, label, args.threads) for label in ("new", "ref")}
            if peak["new"] is None or peak["ref"] is None:
                peak_text = "n/a | n/a | n/a"
            else:
                peak_text = (
                    f"{peak['ref'] / MIB:.0f} | {peak['new'] / MIB:.0f} | "
                    f"{peak['ref'] / max(peak['new'], 1):.2f}x"
                )
            print(
                f"| {n} x {v} | {name} | {ms['ref']:.2f} | {ms['new']:.2f} | {ms['ref'] / ms['new']:.2f}x | "
                f"{saved['ref']:.0f} | {saved['new']:.0f} | {peak_text} |",
                flush=True,
            )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
