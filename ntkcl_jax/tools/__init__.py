"""Small command-line tools (python -m ntkcl_jax.tools.NAME)."""
