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


def _layer_step(
    x, weights, biases, norms, cos, sin, keys, values, length, key_mask, heads, kv_heads, scaling
):
    """A Llama-layout layer's decoding step written out from its formulas in plain torch, in the dtype of its
    inputs: the independent reference of DecodeLayer (float64) and its float32 baseline. Returns (hidden after
    the step, keys, values) with the step's key and value at position ``length``."""
    rows, hidden = x.shape
    d = cos.shape[1]
    norm1, eps1, norm2, eps2 = norms

    def linear(i, inputs):
        out = inputs @ weights[i].T
        return out + biases[i] if biases[i] is not None else out

    def rms(inputs, weight, eps):
        return weight * (inputs * torch.rsqrt(inputs.pow(2).mean(-1, keepdim=True) + eps))

    def rotary(t):  # [rows, n, d]
        half = t[..., d // 2 :], t[..., : d // 2]
        return t * cos[:, None] + torch.cat([-half[0], half[1]], -1) * sin[:, None]

    n = rms(x, norm1, eps1)
    q = rotary(linear(0, n).view(rows, heads, d))
    k = rotary(linear(1, n).view(rows, kv_heads, d))
    v = linear(2, n).view(rows, kv_heads, d)
    keys, values = keys.clone(), values.clone()
    keys[:, :, length], values[:, :, length] = k, v
    group = heads // kv_heads
    cached_k = keys[:, :, : length + 1].repeat_interleave(group, 1)  # [rows, heads, positions, d]
    cached_v = values[:, :, : length + 1].repeat_interleave(group, 1)
    scores = torch.einsum("rhd,rhpd->rhp", q, cached_k) * scaling
    if key_mask is not None:
        seen = key_mask[:, : length + 1].clone()
        seen[:, length] = True  # a query always sees itself
        scores = scores.masked_fill(~seen[:, None], float("-inf"))
    attended = torch.einsum("rhp,rhpd->rhd", scores.softmax(-1), cached_v).reshape(rows, heads * d)
    x = x + linear(3, attended)
    m = rms(x, norm2, eps2)
    gate, up = linear(4, m), linear(5, m)
    return x + linear(6, torch.nn.functional.silu(gate) * up), keys, values


@needs_kernel
@pytest.mark.parametrize("masked", [True, False], ids=["key-mask", "no-mask"])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_a_whole_decoding_layer_is_as_accurate_as_its_formulas_in_float32(rows, masked):
    from numerics import assert_as_accurate_as

    # hidden 20, inner 36 (not multiples of 8: the maps' scalar tails), head_dim 6, 4 query heads over 2
    # key/value heads; biases on all maps but k's; 9 rows: a second tile of input rows.
    g = torch.Generator().manual_seed(7)
    hidden, inner, heads, kv_heads, d, capacity, length = 20, 36, 4, 2, 6, 7, 4
    shapes = [(heads * d, hidden), (kv_heads * d, hidden), (kv_heads * d, hidden), (hidden, heads * d)]
    shapes += [(inner, hidden), (inner, hidden), (hidden, inner)]
    weights = [torch.randn(*s, generator=g) / s[1] ** 0.5 for s in shapes]
    biases = [torch.randn(s[0], generator=g) if i != 1 else None for i, s in enumerate(shapes)]
    norms = (
        1 + 0.1 * torch.randn(hidden, generator=g),
        1e-6,
        1 + 0.1 * torch.randn(hidden, generator=g),
        1e-5,
    )
    x = torch.randn(rows, hidden, generator=g)
    angle = torch.rand(rows, d // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    keys = torch.randn(rows, kv_heads, capacity, d, generator=g)
    values = torch.randn(rows, kv_heads, capacity, d, generator=g)
    key_mask = torch.rand(rows, capacity, generator=g) > 0.4
    key_mask[0, length] = False  # ignored: a query always sees itself
    if not masked:
        key_mask = None
    scaling = d**-0.5

    layer = skinny.DecodeLayer(weights, biases, norms, heads, kv_heads, d, scaling)
    actual = x.clone(), keys.clone(), values.clone()
    with torch.no_grad():
        layer(actual[0], cos, sin, actual[1], actual[2], length, key_mask)
        baseline = _layer_step(
            x, weights, biases, norms, cos, sin, keys, values, length, key_mask, heads, kv_heads, scaling
        )

        def double(t):
            return t.double() if t is not None else None

        reference = _layer_step(
            x.double(), [double(w) for w in weights], [double(b) for b in biases],
            (norms[0].double(), norms[1], norms[2].double(), norms[3]),
            cos.double(), sin.double(), keys.double(), values.double(), length, key_mask, heads, kv_heads, scaling,
        )  # fmt: skip
    for name, a, b, r in zip(["hidden", "keys", "values"], actual, baseline, reference):
        assert_as_accurate_as(a, b, r, msg=name)
    # Only position `length` of the cache is written.
    others = torch.arange(capacity) != length
    assert torch.equal(actual[1][:, :, others], keys[:, :, others])
    assert torch.equal(actual[2][:, :, others], values[:, :, others])
    # A masked key changes nothing: its value may be anything.
    masked = ~key_mask[:, :length] if key_mask is not None else torch.zeros(rows, length, dtype=torch.bool)
    if masked.any():
        noisy = values.clone()
        noisy[:, :, :length][masked[:, None].expand(-1, kv_heads, -1)] = 1e6
        again = x.clone(), keys.clone(), noisy
        with torch.no_grad():
            layer(again[0], cos, sin, again[1], again[2], length, key_mask)
        assert torch.equal(again[0], actual[0])


@needs_kernel
def test_a_decoding_layer_refuses_bad_tensors_by_name():
    hidden, inner, heads, kv_heads, d = 16, 32, 2, 1, 8
    shapes = [(heads * d, hidden), (kv_heads * d, hidden), (kv_heads * d, hidden), (hidden, heads * d)]
    shapes += [(inner, hidden), (inner, hidden), (hidden, inner)]
    weights = [torch.zeros(*s) for s in shapes]
    norms = (torch.ones(hidden), 1e-6, torch.ones(hidden), 1e-6)
    with pytest.raises(ValueError, match=r"map 3: \(16, 8\)"):
        skinny.DecodeLayer(
            [*weights[:3], torch.zeros(16, 8), *weights[4:]], [None] * 7, norms, heads, kv_heads, d, 1.0
        )
    with pytest.raises(ValueError, match="3 query heads over 2"):
        skinny.DecodeLayer(weights, [None] * 7, norms, 3, 2, d, 1.0)
    layer = skinny.DecodeLayer(weights, [None] * 7, norms, heads, kv_heads, d, 1.0)
    cos = sin = torch.ones(2, d)
    cache = torch.zeros(2, kv_heads, 5, d)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"hidden is \(2, 15\)"):
            layer(torch.zeros(2, 15), cos, sin, cache, cache.clone(), 0)
        with pytest.raises(ValueError, match=r"values is .*not contiguous"):
            layer(
                torch.zeros(2, hidden), cos, sin, cache, cache.transpose(2, 3).contiguous().transpose(2, 3), 0
            )
        with pytest.raises(ValueError, match="length 5 leaves no room in a cache of 5"):
            layer(torch.zeros(2, hidden), cos, sin, cache, cache.clone(), 5)
        with pytest.raises(ValueError, match="key_mask"):
            layer(torch.zeros(2, hidden), cos, sin, cache, cache.clone(), 0, torch.ones(2, 5))
