"""Drivers and page generators that train grids of runs and write the docs pages.

Run as programs from the repository root: `python -m scripts.NAME` (`--help` lists the flags);
their shared helpers are `scripts.grid` (a run unless finished) and `scripts.pages` (the evidence
pages). They are not installed with the package (setup.py lists ntkcl_jax and ntk_analysis only).
"""
