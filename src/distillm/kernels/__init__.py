"""CPU kernels that replace slow paths of torch's CPU build, exactly or up to float rounding.

- :mod:`distillm.kernels.gelu`: the tanh-approximated GELU in its sigmoid form (``SigmoidTanhGELU``) and
  ``fuse_tanh_gelu``, which swaps it into a loaded model.
- :mod:`distillm.kernels.packing`: decoding's linear maps (``PackedLinears``): through our kernel below, else
  oneDNN's packed weights (the one module that calls torch's private ``torch.ops.mkldnn`` ops).
- :mod:`distillm.kernels.skinny`: our linear maps for a few rows (``skinny.c``: AVX2, or AVX-512 with the same
  bits) and a Llama-layout layer's whole decoding step (``DecodeLayer``), compiled at first use with the
  system's C compiler and loaded with ctypes; unavailable (and said so) without one.

``benchmarks/gelu.py`` and ``benchmarks/packed_linear.py`` measure them (figures in benchmarks/README.md).
"""
