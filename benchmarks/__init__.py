"""Speed benchmarks that print figures (docs/benchmarks.md, written by benchmarks/report.py).

Run as programs from the repository root: `python -m benchmarks.NAME` (`--help` lists the flags).
They are not installed with the package (setup.py lists ntkcl_jax and ntk_analysis only).
"""
