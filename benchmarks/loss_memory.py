"""Peak memory and time of one forward+backward of the distillation loss: dense logits vs the chunked path.

    .venv/bin/python benchmarks/loss_memory.py                       # CPU, fp32, V in {8192, 32768, 49152}
    .venv/bin/python benchmarks/loss_memory.py --device cuda --dtype bfloat16 --repeats 10

The objective is skew reverse KL (alpha 0.1) with kd_ratio 1 on `--tokens` supervised tokens. Both paths
start from the same inputs: student hidden states [N, H] and lm_head [V, H] (which get gradients), and the
teacher's hidden states [N, H] and head [V, H]. The dense path projects both to full [N, V] logits and
calls `distillation_loss`; the chunked path hands the hidden states and heads to `chunked_distillation_loss`,
so neither side's logits are ever whole. Each (path, V) runs in its own process, so one measurement's
allocator state cannot leak into the next.

One warm-up run, then `--repeats` timed runs. Memory is the peak *above* the inputs during the timed runs:
on CUDA `torch.cuda.max_memory_allocated` minus what was allocated before them; on CPU the resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident set before them, with
glibc's mmap threshold fixed so that freed tensors leave the resident set. Time is the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    """Measure one (path, vocab) configuration in this process; returns the figures."""
    import gc

    import torch

    from distillm.losses import chunked_distillation_loss, distillation_loss, get_divergence

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    n, h, v = args.tokens, args.hidden, args.vocab
    student_hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)  # [N, H]
    student_head = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()  # [V, H]
    teacher_hidden = torch.randn(n, h, device=device, dtype=dtype)  # [N, H]
    teacher_head = (torch.randn(v, h, device=device) / h**0.5).to(dtype)  # [V, H]
    labels = torch.randint(0, v, (n,), device=device)  # [N], every token supervised
    divergence = get_divergence("skew_reverse_kl", skew_alpha=0.1)

    def step() -> None:
        student_hidden.grad = student_head.grad = None
        if args.path == "dense":
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_head.T  # [N, V]
            student_logits = student_hidden @ student_head.T  # [N, V]
            loss = distillation_loss(student_logits, labels, divergence, 1.0, teacher_logits=teacher_logits)
        else:
            loss = chunked_distillation_loss(
                student_hidden,
                student_head,
                labels,
                divergence,
                1.0,
                teacher_hidden=teacher_hidden,
                teacher_head_weight=teacher_head,
                chunk_size=args.chunk_size,
            )
        loss.total.backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: kernels, thread pools, one-time buffers are not what is measured
    gc.collect()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        peak_was_reset = _reset_peak_rss()
        baseline = _read_status_kib("VmRSS") * 1024
    times, cpu_times = [], []
    for _ in range(args.repeats):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
        method = "cuda max_memory_allocated"
    else:
        peak = _read_status_kib("VmHWM") * 1024 - baseline
        method = "VmHWM after reset" if peak_was_reset else "VmHWM since start (reset refused)"
    return {
        "peak_bytes": peak,
        "median_s": statistics.median(times),
        "median_cpu_s": statistics.median(cpu_times),
        "memory_method": method,
    }


def run_in_subprocess(args: argparse.Namespace, path: str, vocab: int) -> dict:
    command = [
        sys.executable, __file__, "--worker", "--path", path, "--vocab", str(vocab),
        "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size),
        "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype,
        "--threads", str(args.threads),
    ]  # fmt: skip
    # A fixed mmap threshold makes glibc hand every block of 1 MiB or more back to the OS when it is freed
    # (by default the threshold rises with use, and freed blocks stay resident in per-thread arenas): the
    # resident set then follows the live tensors, and the warm-up run leaves no cache that hides a peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 49152])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=128, help="the library default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (0: torch's default)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["dense", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.vocab = args.vocab[0]
        print(json.dumps(worker(args)))
        return 0

    print(
        f"skew_reverse_kl (alpha 0.1), kd_ratio 1; tokens {args.tokens}, hidden {args.hidden}, {args.dtype}, "
        f"device {args.device}, chunk {args.chunk_size}, median of {args.repeats} runs after 1 warm-up.\n"
        "Teacher given as hidden states + head: dense projects it to full logits, chunked per chunk.\n"
        "Peak = memory above the inputs during forward+backward; each configuration in its own process."
    )
    header = (
        f"{'V':>6} | {'dense MiB':>9} | {'chunked MiB':>11} | {'mem ratio':>9} | {'dense s':>7} | "
        f"{'chunked s':>9} | {'speedup':>7} | {'dense cpu s':>11} | {'chunked cpu s':>13} | {'cpu ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    method = None
    for vocab in args.vocab:
        dense = run_in_subprocess(args, "dense", vocab)
        chunked = run_in_subprocess(args, "chunked", vocab)
        method = chunked["memory_method"]
        mib = 1 << 20
        print(
            f"{vocab:>6} | {dense['peak_bytes'] / mib:>9.0f} | {chunked['peak_bytes'] / mib:>11.0f} | "
            f"{dense['peak_bytes'] / max(chunked['peak_bytes'], 1):>8.1f}x | {dense['median_s']:>7.2f} | "
            f"{chunked['median_s']:>9.2f} | {dense['median_s'] / chunked['median_s']:>6.2f}x | "
            f"{dense['median_cpu_s']:>11.2f} | {chunked['median_cpu_s']:>13.2f} | "
            f"{dense['median_cpu_s'] / chunked['median_cpu_s']:>8.2f}x",
            flush=True,
        )
    print(
        f"memory measured by: {method}. mem ratio = dense / chunked peak; speedup = dense / chunked wall "
        "time; cpu s = process CPU time (user + system, all threads), less sensitive to other load."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
