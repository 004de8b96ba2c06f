"""8 emulated CPU devices, set before JAX starts (the CI machine has no accelerator). What several
test files share lives in ``helpers.py``."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
