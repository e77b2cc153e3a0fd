"""CPU kernels that replace slow paths of torch's CPU build, exactly or up to float rounding.

- :mod:`distillm.kernels.gelu`: the tanh-approximated GELU in its sigmoid form (``SigmoidTanhGELU``) and
  ``fuse_tanh_gelu``, which swaps it into a loaded model.
- :mod:`distillm.kernels.packing`: oneDNN's packed-weight linear maps for decoding (``PackedLinears``), the
  one module that calls torch's private ``torch.ops.mkldnn`` ops.

``benchmarks/gelu.py`` and ``benchmarks/packed_linear.py`` measure them (figures in benchmarks/README.md).
"""
