"""Running one jitted function on the native-kernel path or on XLA's path."""

import os
from unittest import mock

import jax

from optax_gaf._src import native_gram


def run_on_path(jitted, *args, native: bool):
  """Lowers and runs ``jitted`` with the native kernels on or off, checked in the HLO.

  ``OPTAX_GAF_NATIVE_GRAM`` is read at trace time, so callers pass a freshly
  built jitted function: no cache can carry one path into the other (and no
  ``jax.clear_caches``, which crashed a CI run while a computation was in
  flight). The HLO must call a kernel exactly when ``native`` is true.
  """
  with mock.patch.dict(os.environ, {"OPTAX_GAF_NATIVE_GRAM": "1" if native else "0"}):
    hlo = jitted.lower(*args).as_text()
    assert any(target in hlo for target in native_gram._SYMBOLS) == native
    return jax.block_until_ready(jitted(*args))
