"""Test configuration: float64 available for the oracle, fixed seeds."""

import os

# Multi-device tests run in subprocesses with their own XLA_FLAGS; the main
# process keeps one CPU device.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
