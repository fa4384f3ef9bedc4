"""Which implementation computes the models: one switch, set once by the entry scripts (``--engine``).

* ``xla``: the plain Flax modules of meso_jax.models, compiled by XLA: the reference, on any device.
* ``native``: on the CPU, the hand-tuned paths: Meso-4's fused inference and training blocks
  (meso_jax.cpu.fast_inference, meso_jax.cpu.fast_training) and the native kernels and oneDNN convolutions
  (meso_jax.cpu.onednn, built with the machine's C++ compiler on first use); each is tested equal to the
  Flax module. Selecting it where it cannot run is an error that says why.
* ``auto`` (the default): native where it runs (the CPU, one device), otherwise XLA; where the native
  library cannot be built (no compiler, no oneDNN wheel) the fused paths still run and one info line
  says why.

The entry scripts take the flag's default from the environment variable MESO_JAX_ENGINE when it is set;
the library reads only what ``select`` was given.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

ENGINES = ("auto", "xla", "native")
ENVIRONMENT_VARIABLE = "MESO_JAX_ENGINE"

_selected = "auto"


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run here; ``str(err)`` says why, on one line."""


def select(name: str) -> None:
    """Makes ``name`` (auto | xla | native) the engine of everything traced from now on."""
    global _selected  # pylint: disable=global-statement
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name == "native":
        import jax  # pylint: disable=import-outside-toplevel  (the flags' module imports this one: stay light)

        from meso_jax.cpu import onednn  # pylint: disable=import-outside-toplevel  (builds the library)

        if jax.default_backend() != "cpu":
            raise EngineUnavailable(f"--engine=native is for the CPU; this is {jax.default_backend()} "
                                    "(use auto or xla)")
        reason = onednn.unavailable_reason()
        if reason is not None:
            raise EngineUnavailable(f"--engine=native cannot run here: {reason} (use auto or xla)")
    _selected = name


def selected() -> str:
    """The engine chosen (auto | xla | native)."""
    return _selected


def native() -> bool:
    """Whether code traced now may use the native paths (engine auto or native)."""
    return _selected != "xla"


@contextlib.contextmanager
def selecting(name: str) -> Iterator[None]:
    """Within the block, ``name`` is the engine (for side-by-side comparisons in tests and benchmarks;
    JAX reuses an earlier trace of a function, so trace a fresh one inside)."""
    previous = _selected
    select(name)
    try:
        yield
    finally:
        select(previous)


def conv_general_dilated(lhs, rhs, window_strides, padding, **arguments):
    """``jax.lax.conv_general_dilated`` as the selected engine computes it: the models' convolutions call
    this (through flax's ``nn.Conv``), so meso_jax.models needs no engine of its own. The native engine's
    (meso_jax.cpu.onednn) goes to oneDNN where it applies and to XLA otherwise."""
    if native():
        from meso_jax.cpu import onednn  # pylint: disable=import-outside-toplevel

        return onednn.conv_general_dilated(lhs, rhs, window_strides, padding, **arguments)
    import jax  # pylint: disable=import-outside-toplevel

    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **arguments)


def fused_training_block():
    """The selected engine's fused training form of models.ConvBlock (meso_jax.cpu.fast_training: its
    ``supports`` and ``conv_relu_bn_pool_train``), or None where training uses the Flax block itself."""
    if not native():
        return None
    from meso_jax.cpu import fast_training  # pylint: disable=import-outside-toplevel

    return fast_training if fast_training.enabled() else None


def describe() -> str:
    """The engine in a few words, for logs and benchmark output."""
    if _selected == "xla":
        return "xla (the plain Flax modules)"
    import jax  # pylint: disable=import-outside-toplevel

    from meso_jax.cpu import onednn  # pylint: disable=import-outside-toplevel

    if jax.default_backend() != "cpu":
        return f"{_selected}: xla (the plain Flax modules; the native paths are for the CPU)"
    reason = onednn.unavailable_reason()
    if reason is None:
        return f"{_selected}: native (fused Meso-4 blocks, native kernels, oneDNN convolutions)"
    return f"{_selected}: fused Meso-4 blocks in XLA (native library unavailable: {reason})"
