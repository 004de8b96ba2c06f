"""Huge pages for the C allocator (alexnet_jax.host): the environment it builds, when it applies,
and the one restart of a program that runs steps."""

import os
import platform
import subprocess
import sys

import pytest

from alexnet_jax import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tunable_is_added_to_the_tunables_already_set():
  assert not host.has_huge_pages_tunable({})
  assert not host.has_huge_pages_tunable({'GLIBC_TUNABLES': 'glibc.malloc.hugetlbx=1'})
  env = host.environ_with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'X': '1'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'X': '1'}
  assert host.has_huge_pages_tunable(env)
  assert host.environ_with_huge_pages({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('mode, usable', [('always [madvise] never', True),
                                          ('[always] madvise never', True),
                                          ('always madvise [never]', False)])
def test_huge_pages_need_glibc_and_transparent_huge_pages(tmp_path, mode, usable):
  thp = tmp_path / 'enabled'
  thp.write_text(mode + '\n')
  glibc_ok = platform.system() == 'Linux' and (host._glibc_version() or (0, 0)) >= (2, 35)
  assert host.huge_pages_supported(str(thp)) == (usable and glibc_ok)
  assert not host.huge_pages_supported(str(tmp_path / 'missing'))


@pytest.mark.skipif(not host.huge_pages_supported(), reason='no glibc >= 2.35 with THP here')
@pytest.mark.parametrize('huge_pages', [True, False])
def test_main_restarts_once_with_the_tunable_and_the_same_arguments(tmp_path, huge_pages):
  # A data set that does not exist: the program gets as far as opening it, after the restart
  # (config values are checked before it), and its error must still name what the user typed (the
  # arguments survived the restart).
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run([
      sys.executable, '-m', 'alexnet_jax.main', '--config=configs/demo.py',
      f'--workdir={tmp_path / "run"}', '--config.dataset.name=no_such_set',
      f'--huge_pages={str(huge_pages).lower()}'
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count('restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1') == int(
      huge_pages)
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'no_such_set' in errors[0], proc.stderr[-2000:]
