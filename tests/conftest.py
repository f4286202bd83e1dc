"""Test configuration shared by the suite.

Multi-device tests run in subprocesses that set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax;
the main test process keeps the default single CPU device.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
