"""Force several CPU devices before JAX initialises so the sharded path is exercised."""

import os
import tempfile

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Tests compile the same steps many times (one model, several tests): share them
# through JAX's persistent compilation cache, in a directory private to this run.
_cache = tempfile.mkdtemp(prefix='fttw_jax_test_cache_')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _cache)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

# The C++ custom call (fttw_jax.sparse.kernel) is built once per run into a private cache,
# from the source under test.
os.environ.setdefault('FTTW_JAX_CACHE', tempfile.mkdtemp(prefix='fttw_jax_native_'))
