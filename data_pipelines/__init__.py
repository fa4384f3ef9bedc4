"""Input data for meso-jax: decoding, faces, labelled folders, the face cache and tf.data pipelines."""
