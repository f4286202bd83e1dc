"""Test configuration shared by the suite.

Multi-device tests run in subprocesses that set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax;
the main test process keeps the default single CPU device. float64 checks use
``jax.experimental.enable_x64`` locally; x64 is never switched on globally.

Hypothesis runs a small, derandomized number of examples without deadlines
(compilation times vary on shared CI machines) and without shrinking (every
shrink step recompiles; a failure reports the unshrunk example); set
``HYPOTHESIS_PROFILE=thorough`` for a longer local run.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:
  import hypothesis
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
  hypothesis = None

if hypothesis is not None:
  hypothesis.settings.register_profile(
      "ci", max_examples=12, deadline=None, derandomize=True,
      phases=(hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate),
      suppress_health_check=[hypothesis.HealthCheck.too_slow],
      print_blob=True)
  hypothesis.settings.register_profile(
      "thorough", max_examples=300, deadline=None,
      suppress_health_check=[hypothesis.HealthCheck.too_slow])
  hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
