"""Our native decoding kernel (``distillm.kernels.skinny``): its results, its build and its fallbacks."""

from __future__ import annotations

import logging
import platform
import shutil

import pytest
import torch

from distillm.kernels import skinny
from numerics import gamma


def _x86_with_avx2_and_a_compiler() -> str | None:
    """Why the kernel cannot be expected here, or None where it must build and run."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86 AVX2 code; this is {platform.machine()}"
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler (cc/gcc) to build the kernel"
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return None
    if " avx2" not in flags or " fma" not in flags:
        return "this CPU lacks AVX2/FMA"
    return None


WHY_NOT = _x86_with_avx2_and_a_compiler()
needs_kernel = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


def _avx512_missing() -> str | None:
    """Why the kernel's AVX-512 path cannot run here, or None."""
    if WHY_NOT is not None:
        return WHY_NOT
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return "no /proc/cpuinfo to read the CPU's flags from"
    return None if " avx512f" in flags else "this CPU lacks AVX-512F (the kernel's AVX2 path runs here)"


WHY_NOT_AVX512 = _avx512_missing()
PATHS = [
    pytest.param(False, id="avx2"),
    pytest.param(
        True,
        id="avx512",
        marks=pytest.mark.skipif(WHY_NOT_AVX512 is not None, reason=WHY_NOT_AVX512 or ""),
    ),
]


@pytest.fixture
def fresh_library():
    """Forget the loaded library before and after the test, so that its environment decides."""
    skinny._library.cache_clear()
    yield
    skinny._library.cache_clear()


def test_the_kernel_builds_and_loads_on_an_x86_cpu_with_avx2_and_a_compiler():
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    assert skinny.available()  # a build or load failure here would silently cost decoding half its speed


@needs_kernel
@pytest.mark.parametrize("rows", [*range(1, 18), 40])  # every tile size 1-8, two tiles, 17 and 40 rows
@pytest.mark.parametrize(
    ("in_features", "out_features"), [(576, 130), (37, 64), (8, 1), (5, 9), (1029, 70)]
)  # in_features 5: only the scalar tail runs; 37, 1029: vectors and a tail
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("avx512", PATHS)
def test_the_kernel_is_within_the_rounding_bound_of_the_exact_product(
    rows, in_features, out_features, with_bias, avx512
):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    actual = skinny.skinny_linear(x, weight, bias, avx512=avx512)
    exact = x.double() @ weight.double().T  # [rows, out]
    magnitude = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        exact, magnitude = exact + bias.double(), magnitude + bias.double().abs()
    # Any order of the in_features products and the bias: within gamma_(n+1) of the exact sum (numerics.py),
    # plus the rounding of the result to float32.
    bound = gamma(in_features + 2, torch.float32) * magnitude
    assert actual.shape == (rows, out_features) and actual.dtype == torch.float32
    assert bool(((actual.double() - exact).abs() <= bound).all())
    # A wrong index or a dropped tail (in_features not a multiple of 8) is far outside the bound.
    assert float((actual.double() - exact).abs().max()) < 1e-3 * float(magnitude.max())


@needs_kernel
def test_a_row_gets_the_same_bits_alone_in_any_batch_any_order_and_with_any_threads():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(13, 300, generator=generator)  # a full 8-row tile and a 5-row remainder
    weight = torch.randn(200, 300, generator=generator)
    batch = skinny.skinny_linear(x, weight)
    order = torch.randperm(13, generator=generator)
    assert torch.equal(skinny.skinny_linear(x[order], weight), batch[order])
    for row in range(13):
        assert torch.equal(skinny.skinny_linear(x[row : row + 1], weight), batch[row : row + 1])
    threads = torch.get_num_threads()
    try:  # each output is summed by one thread, in the same order, however many there are
        torch.set_num_threads(1)
        assert torch.equal(skinny.skinny_linear(x, weight), batch)
        torch.set_num_threads(3)
        assert torch.equal(skinny.skinny_linear(x, weight), batch)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(WHY_NOT_AVX512 is not None, reason=WHY_NOT_AVX512 or "")
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17])  # odd rows leave a pair's high half empty
@pytest.mark.parametrize(("in_features", "out_features"), [(576, 131), (37, 64), (5, 9), (1029, 1)])
def test_the_avx512_path_gives_the_avx2_paths_bits(rows, in_features, out_features):
    """Each output is summed in the same order on both paths (skinny.c), so a CPU's choice of path never
    changes what decoding samples."""
    assert skinny.instruction_set() == "avx512"
    generator = torch.Generator().manual_seed(rows + in_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    wide = skinny.skinny_linear(x, weight, bias, avx512=True)
    assert torch.equal(wide, skinny.skinny_linear(x, weight, bias, avx512=False))
    assert torch.equal(wide, skinny.skinny_linear(x, weight, bias))  # the default path here


@needs_kernel
@pytest.mark.parametrize("avx512", PATHS)
def test_several_maps_in_one_call_give_each_maps_own_bits(avx512):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 96, generator=generator)  # 10 rows: a full tile and a remainder
    # Odd sizes, so that the threads' shares and the AVX-512 path's weight-row pairs straddle two maps.
    weights = [torch.randn(out, 96, generator=generator) for out in (9, 3, 64, 1)]
    biases = [torch.randn(9, generator=generator), None, torch.randn(64, generator=generator), None]
    alone = [skinny.skinny_linear(x, w, b, avx512=avx512) for w, b in zip(weights, biases)]
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3, 5):
            torch.set_num_threads(count)
            together = skinny.skinny_linears(x, weights, biases, avx512=avx512)
            assert [t.shape for t in together] == [(2, 5, 9), (2, 5, 3), (2, 5, 64), (2, 5, 1)]
            assert all(torch.equal(t, a) for t, a in zip(together, alone))
    finally:
        torch.set_num_threads(threads)
    maps = skinny.Maps(weights, biases)
    with torch.no_grad():
        weights[2].mul_(2)  # an in-place change is seen: the call reads the weight's own memory
    assert torch.equal(maps(x, avx512=avx512)[2], skinny.skinny_linear(x, weights[2], biases[2]))
    with pytest.raises(ValueError, match=r"weights and as many biases; got 2 and 1"):
        skinny.skinny_linears(x, weights[:2], biases[:1])
    with pytest.raises(ValueError, match=r"contiguous float32 CPU weights \[out, 96\]; got \(4, 95\)"):
        skinny.skinny_linears(x, [weights[0], torch.randn(4, 95)])
    with pytest.raises(
        ValueError, match=r"inputs \(3, 95\) torch.float32 on cpu, weight \(9, 96\), \(3, 96\)"
    ):
        skinny.Maps(weights[:2])(torch.randn(3, 95))


@needs_kernel
def test_asking_for_the_avx512_path_on_a_cpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(skinny._library(), "wide", False)  # as on a CPU without AVX-512F
    assert skinny.instruction_set() == "avx2"
    with pytest.raises(ValueError, match="lacks AVX-512F: call skinny_linear with avx512=None or False"):
        skinny.skinny_linear(torch.randn(2, 16), torch.randn(3, 16), avx512=True)


@needs_kernel
def test_inputs_keep_their_leading_shape_may_be_strided_and_bad_ones_are_refused_by_name():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 16, generator=generator)
    x = torch.randn(16, 2, 3, generator=generator).permute(1, 2, 0)  # [2, 3, 16], not contiguous
    out = skinny.skinny_linear(x, weight)
    assert out.shape == (2, 3, 24)
    assert torch.equal(out, skinny.skinny_linear(x.contiguous(), weight))
    with pytest.raises(ValueError, match=r"inputs \(2, 8\) torch.float32 on cpu, weight \(24, 16\)"):
        skinny.skinny_linear(torch.randn(2, 8), weight)
    with pytest.raises(ValueError, match="on meta"):  # never a pointer into another device's memory
        skinny.skinny_linear(torch.empty(2, 16, device="meta"), weight)
    with pytest.raises(ValueError, match="no autograd"):
        skinny.skinny_linear(torch.randn(2, 16), weight.clone().requires_grad_())
    with torch.no_grad():
        skinny.skinny_linear(torch.randn(2, 16), weight.clone().requires_grad_())
    with pytest.raises(ValueError, match="float64"):
        skinny.skinny_linear(torch.randn(2, 16, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match=r"bias must be float32 \[24\] on the CPU"):
        skinny.skinny_linear(torch.randn(2, 16), weight, torch.randn(23))
    assert not skinny.supports(weight.t()) and not skinny.supports(weight.double())


@needs_kernel
def test_the_library_is_built_once_into_the_cache_and_reused(tmp_path, monkeypatch, fresh_library):
    monkeypatch.setenv("DISTILLM_KERNEL_CACHE", str(tmp_path))
    (tmp_path / "skinny-0123456789abcdef.so").write_bytes(b"an older version's library")
    assert skinny.available()
    (library,) = tmp_path.iterdir()  # one library: no partial file left, the older version removed
    assert library.name.startswith("skinny-") and library.suffix == ".so"
    built = library.stat().st_mtime_ns
    skinny._library.cache_clear()
    assert skinny.available() and library.stat().st_mtime_ns == built
    # A cached library that does not load (truncated, say) is built again. (In another folder: this one's is
    # loaded now, and dlopen would hand back the loaded one for the same path.)
    other = tmp_path.parent / f"{tmp_path.name}-other"
    other.mkdir()
    (other / library.name).write_bytes(b"not a shared library")
    monkeypatch.setenv("DISTILLM_KERNEL_CACHE", str(other))
    skinny._library.cache_clear()
    assert skinny.available() and (other / library.name).stat().st_size > 1000


def test_without_a_working_compiler_decoding_falls_back_with_a_warning(
    tmp_path, monkeypatch, caplog, fresh_library
):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"the build is only tried on x86; this is {platform.machine()}")
    monkeypatch.setenv("DISTILLM_KERNEL_CACHE", str(tmp_path))
    # A "compiler" that always fails, given as a command line with an argument (as CC="ccache gcc" would be).
    monkeypatch.setenv("CC", f"{shutil.which('false') or '/bin/false'} --quiet")
    with caplog.at_level(logging.WARNING, logger="distillm.kernels.skinny"):
        assert not skinny.available()
    assert "unavailable" in caplog.text and "false --quiet failed" in caplog.text and "CC=gcc" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing half-built left in the cache
    with pytest.raises(RuntimeError, match="unavailable here"):
        skinny.skinny_linear(torch.randn(1, 4), torch.randn(3, 4))


def test_the_kernel_can_be_turned_off(monkeypatch, fresh_library):
    monkeypatch.setenv("DISTILLM_NATIVE_KERNELS", "0")
    assert not skinny.available()


def test_a_switch_value_other_than_0_or_1_is_named_in_a_warning(monkeypatch, caplog, fresh_library):
    monkeypatch.setenv("DISTILLM_NATIVE_KERNELS", "off")
    with caplog.at_level(logging.WARNING, logger="distillm.kernels.skinny"):
        skinny.available()
    assert "DISTILLM_NATIVE_KERNELS='off' is neither 0 (off) nor 1 (on)" in caplog.text


def test_an_unwritable_cache_says_which_variable_moves_it(tmp_path, monkeypatch, caplog, fresh_library):
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DISTILLM_KERNEL_CACHE", str(blocker / "kernels"))  # a folder under a file
    with caplog.at_level(logging.WARNING, logger="distillm.kernels.skinny"):
        assert not skinny.available()
    assert "DISTILLM_KERNEL_CACHE" in caplog.text and "a-file" in caplog.text


@needs_kernel
def test_packed_maps_of_one_input_run_in_one_call_with_each_maps_bits(monkeypatch):
    from torch import nn

    from distillm.kernels import packing

    torch.manual_seed(0)
    maps = [nn.Linear(64, out, bias=out != 3) for out in (64, 3, 16)]
    other = nn.Linear(64, 8)  # not packed
    packed = packing.PackedLinears()
    assert packed.pack(maps, batch_size=4)
    x = torch.randn(4, 1, 64)
    calls = []
    original = skinny.Maps.__call__
    monkeypatch.setattr(
        skinny.Maps, "__call__", lambda self, *a, **k: calls.append(self) or original(self, *a, **k)
    )
    with torch.no_grad():
        each = [packed.linear(m, x) for m in maps]
        calls.clear()
        together = packed.many(maps, x)
        assert len(calls) == 1 and all(torch.equal(t, e) for t, e in zip(together, each))
        for t, m in zip(together, maps):  # and the maps' own forwards: each within gamma_66 of the exact sum
            magnitude = x.double().abs() @ m.weight.double().abs().T
            if m.bias is not None:
                magnitude = magnitude + m.bias.double().abs()
            assert bool(((t - m(x)).double().abs() <= 2 * gamma(66, torch.float32) * magnitude).all())
        mixed = packed.many([maps[0], other], x)  # one unpacked: each map its own way
        assert torch.equal(mixed[0], each[0]) and torch.equal(mixed[1], other(x))
    with_grad = packed.many(maps, x)  # gradients on: the modules' own forwards, which autograd follows
    assert all(t.requires_grad and torch.equal(t, m(x)) for t, m in zip(with_grad, maps))
