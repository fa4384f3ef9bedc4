"""MesoNet deepfake detection in JAX/Flax. The public API: ``load_detector`` (meso_jax.detector)."""


def __getattr__(name: str):
    # Imported on first use, so that importing one submodule (e.g. meso_jax.metrics) stays light.
    if name == "load_detector":
        from meso_jax.detector import load_detector  # pylint: disable=import-outside-toplevel
        return load_detector
    raise AttributeError(f"module 'meso_jax' has no attribute {name!r}")
