"""The native CPU engine: faster implementations of the models in meso_jax.models, each tested equal to
the plain Flax module, used where ``meso_jax.engine`` allows (``--engine=auto|native``).

* ``onednn``: builds (on first use, with the machine's C++ compiler) and loads the native library of
  ``onednn_conv.cc`` (oneDNN convolutions and their gradients), ``first_block.cc`` (Meso-4's first block
  in training) and ``pool_select.cc`` (the later blocks' pooling selection), called from XLA through its
  FFI; ``available()`` / ``unavailable_reason()`` say whether it runs here.
* ``fast_inference``: Meso-4's scoring path (its first block phased, the rest on oneDNN).
* ``fast_training``: Meso-4's fused training blocks with their own gradients.

Nothing here is needed to run: without a compiler or the oneDNN wheel the plain XLA path gives the
same results (float32 rounding).
"""
