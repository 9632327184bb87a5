"""Drivers and page generators that train grids of runs and write the docs pages.

Run as programs (`python scripts/NAME.py`). Those that import `scripts.*` first put the
repository root on sys.path; tests do the same, then import them as `scripts.NAME`. They are not
installed with the package (setup.py lists ntkcl_jax and ntk_analysis only).
"""
