"""Test set-up: 8 fake CPU devices (must happen before JAX initialises its backends), and one
persistent XLA compilation cache for the whole session, shared with the subprocesses tests start
(they inherit this environment): many tests build the same tiny models and launcher runs, and a
cached executable is the one XLA compiled (same HLO, same machine), so results are unchanged."""
import os
import shutil
import tempfile

import _xla  # tests/_xla.py: also why the tests compile at XLA's lowest CPU optimisation level

_OWN_CACHE = None
os.environ.setdefault("XLA_FLAGS", _xla.flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="ntkcl-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  # Loading a cached CPU executable logs a benign C++ warning about tuning flags (prefer-no-gather)
  # on stderr; the CLI tests read stderr line by line.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("PYTEST_XDIST_WORKER") and _OWN_CACHE is None:
  # A pytest-xdist worker (README: `-n 2`) inherits the controller's cache; JAX writes cache
  # entries without a lock, so each worker (and its subprocesses) keeps a folder of its own
  # inside it, removed with it.
  _worker_cache = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"],
                               os.environ["PYTEST_XDIST_WORKER"])
  os.makedirs(_worker_cache, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _worker_cache

import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path to ../shared/data (real image archives); skips where it is absent (users' machines)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real image archives not found at {SHARED_DATA}: only the project's own "
                "machines have ../shared/data; this test needs them")
  return SHARED_DATA


# The files that take minutes (their tests' seconds summed, `--durations=0` on the 2-core CI
# machine), run first: with `--dist loadfile` a file runs whole on one worker, and a heavy file
# started last keeps one worker busy while the other idles. Order changes wall time only.
FIRST = ("test_train_demo.py",       # 340 s: the real DINOv2-S/14 demo and its analysis
         "test_theory.py",           # 310 s: a tiny sweep of every measured part
         "test_ntk_nt_backend.py",   # 280 s: neural-tangents' three implementations
         "test_cli_errors.py",       # 200 s: one CLI process per bad input
         "test_notebooks.py",        # 190 s: both notebooks at tiny scale
         "test_ntk_multidevice.py",  # 170 s
         "test_learner.py",          # 160 s
         "test_precision.py")        # 120 s


def pytest_collection_modifyitems(items):
  """Heavy files first (FIRST), the rest in collection order; README's `--no-loadscope-reorder`
  keeps xdist from re-sorting files by their number of tests."""
  rank = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
