"""Command-line tools: generated image folders, the GPU check (`python -m lmbbo_jax.tools.X`)."""
