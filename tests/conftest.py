"""Test set-up: 8 fake CPU devices (must happen before JAX initialises its backends)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
