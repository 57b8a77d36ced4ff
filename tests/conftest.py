"""Eight fake CPU devices for every test, set before JAX initialises its backend."""

import os

# The tests run tiny programs many times: XLA's cheapest optimisation level compiles them
# about a third faster. Subprocesses get FAST_COMPILE without the fake devices.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

# One persistent compilation cache for the session and the CLI subprocesses it starts: the
# same tiny U-Net step is compiled by many tests.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Runs a test body with float64 as JAX's default float."""
    with jax.enable_x64(True):
        yield
