"""The launch scripts for a TPU pod and a SLURM cluster, run for real against stand-ins for what CI
has not got.

TPU pod (``launch/tpu_pod.sh``): a stand-in ``gcloud``, the narrowest honest stand-in for a TPU
pod. It implements only the two commands the script uses, and does to N=2 workers what they do to
a pod's workers: ``compute tpus tpu-vm scp SRC TPU:DEST --worker=all`` copies into each worker's
home (a directory here), ``compute tpus tpu-vm ssh TPU --worker=all --command=CMD`` runs CMD with
bash in each worker's home, with none of the caller's environment (as over ssh), and exits with
the first failing worker's status. On the workers' PATH stand-in interpreters record what they
were asked to run. The real gcloud (/usr/bin/gcloud; there is no network) is never reached: the
stand-in comes first on the PATH, or is named by GCLOUD.

SLURM (``launch/slurm_gpu.sh``): ``srun`` and ``scontrol`` are stand-ins (no SLURM daemons in
CI); the script, the training processes and JAX's own SLURM detection (coordinator, process count
and id from SLURM's variables) are real. The GPU layouts are tested on
``distributed.slurm_local_devices`` with SLURM's variables as they would be on GPU nodes.
"""

import contextlib
import json
import os
import random
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys

import pytest

from alexnet_jax import distributed, host
from alexnet_jax.errors import MeshError

from helpers import XLA_FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SCRIPT = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SLURM_SCRIPT = os.path.join(REPO, 'launch', 'slurm_gpu.sh')
WORKERS = 2

# ----------------------------------------------------------------------------------------------
# TPU pod

GCLOUD = r'''#!{python}
"""Stand-in gcloud: `compute tpus tpu-vm scp|ssh` on {workers} workers, each a home directory."""
import json, os, shutil, subprocess, sys
root = {root!r}
with open(os.path.join(root, 'gcloud_calls.jsonl'), 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\n')
flags = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--'))
words = [a for a in sys.argv[1:] if not a.startswith('--')]
pod = words[:3] == ['compute', 'tpus', 'tpu-vm'] and flags.get('worker') == 'all'
if not pod or 'zone' not in flags:
  sys.exit('stand-in gcloud: unsupported command %r' % sys.argv[1:])
homes = [os.path.join(root, 'worker%d' % i) for i in range({workers})]
if words[3:4] == ['scp'] and len(words) == 6 and words[5].startswith({tpu!r} + ':'):
  for home in homes:
    shutil.copy(words[4], os.path.join(home, words[5].split(':', 1)[1]))
  sys.exit(0)
if words[3:] == ['ssh', {tpu!r}] and 'command' in flags:
  procs = []
  for i, home in enumerate(homes):  # as over ssh: the worker's own environment, not the caller's
    env = dict(HOME=home, TPU_WORKER_ID=str(i), PATH={worker_path!r})
    procs.append(subprocess.Popen(['bash', '-c', flags['command']], cwd=home, env=env))
  statuses = [p.wait() for p in procs]
  sys.exit(next((s for s in statuses if s), 0))
sys.exit('stand-in gcloud: unsupported command %r' % sys.argv[1:])
'''

# A worker's python3 (also installed as python and pip, to catch the script calling those): it
# records its name, arguments, directory and ALEXNET_JAX_DISTRIBUTED; `-m alexnet_jax.main` exits
# with the status in ~/main_status where that file exists (a worker whose run fails).
INTERPRETER = r"""#!{python}
import json, os, sys
with open(os.path.join(os.environ['HOME'], 'calls.jsonl'), 'a') as f:
  f.write(json.dumps(dict(program=os.path.basename(sys.argv[0]), argv=sys.argv[1:],
                          cwd=os.getcwd(), auto=os.environ.get('ALEXNET_JAX_DISTRIBUTED'))) + '\n')
status = os.path.join(os.environ['HOME'], 'main_status')
if sys.argv[1:3] == ['-m', 'alexnet_jax.main'] and os.path.exists(status):
  sys.exit(int(open(status).read()))
"""

# Overrides that a shell would mangle unquoted: the README's tuple, spaces and quotes, $ and ;,
# a glob, backslashes and backquotes, a newline, an empty argument.
TRICKY = [
    '--config.model.remove=(3,4)', '--config.name=it\'s a "test" run', 'dollar=$HOME;echo oops',
    '*', 'back\\slash `tick`', 'two\nlines', ''
]


def _executable(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return str(path)


def _tpu_pod(tmp_path, tpu='my-tpu'):
  """The stand-in pod: workers' homes, the workers' stand-in interpreters, the stand-in gcloud (in
  ``bin/``) and the launch environment (``bin/`` first on the PATH, no GCLOUD)."""
  stand_ins, worker_bin = tmp_path / 'bin', tmp_path / 'worker_bin'
  stand_ins.mkdir()
  worker_bin.mkdir()
  for i in range(WORKERS):
    (tmp_path / f'worker{i}').mkdir()
  for name in ('python3', 'python', 'pip'):
    _executable(worker_bin / name, INTERPRETER.format(python=sys.executable))
  gcloud = _executable(
      stand_ins / 'gcloud',
      GCLOUD.format(python=sys.executable, root=str(tmp_path), workers=WORKERS, tpu=tpu,
                    worker_path=f'{worker_bin}:/usr/local/bin:/usr/bin:/bin'))
  env = {k: v for k, v in os.environ.items() if k not in ('GCLOUD', 'PROJECT')}
  env['PATH'] = f'{stand_ins}:{env["PATH"]}'
  return gcloud, env


def _calls(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


def test_tpu_pod_copies_installs_and_runs_every_argument_unchanged_on_every_worker(tmp_path):
  _, env = _tpu_pod(tmp_path)
  workdir = 'gs://bucket/run dir'
  proc = subprocess.run(
      ['bash', TPU_SCRIPT, 'my-tpu', 'us-central2-b', 'configs/pod.py', workdir, *TRICKY],
      cwd=tmp_path, env=dict(env, PROJECT='my project'), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  gcloud_calls = _calls(tmp_path / 'gcloud_calls.jsonl')
  assert [c[:5] for c in gcloud_calls
         ] == [['--project=my project', 'compute', 'tpus', 'tpu-vm', c] for c in ('scp', 'ssh')]
  assert all('--zone=us-central2-b' in c for c in gcloud_calls)
  main_argv = ['-m', 'alexnet_jax.main', '--config=configs/pod.py', f'--workdir={workdir}', *TRICKY]
  for i in range(WORKERS):
    copy = tmp_path / f'worker{i}' / 'alexnet_jax'
    assert (copy / 'alexnet_jax' / 'main.py').is_file() and (copy / 'configs' / 'pod.py').is_file()
    with open(copy / 'launch' / 'tpu_pod.sh') as f, open(TPU_SCRIPT) as g:
      assert f.read() == g.read()
    assert not (copy / '.venv').exists() and not (copy / '.git').exists()  # tracked files only
    assert _calls(tmp_path / f'worker{i}' / 'calls.jsonl') == [
        dict(program='python3', argv=['-m', 'pip', 'install', '-q', '-e', '.[tpu,gcs]'],
             cwd=str(copy), auto=None),
        dict(program='python3', argv=main_argv, cwd=str(copy), auto='auto'),
    ]


def test_tpu_pod_a_failing_worker_fails_the_launch(tmp_path):
  gcloud, env = _tpu_pod(tmp_path)
  (tmp_path / 'worker1' / 'main_status').write_text('3')
  # GCLOUD names the stand-in; a gcloud first on the PATH fails loudly if the script ignored it.
  guard = tmp_path / 'guard'
  guard.mkdir()
  _executable(guard / 'gcloud',
              '#!/bin/sh\necho "gcloud from the PATH despite GCLOUD" >&2\nexit 99\n')
  env['PATH'] = f'{guard}:{env["PATH"]}'
  proc = subprocess.run(
      ['bash', TPU_SCRIPT, 'my-tpu', 'us-central2-b', 'configs/pod.py', 'gs://b/r'], cwd=tmp_path,
      env=dict(env, GCLOUD=gcloud), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert [c['argv'][1] for c in _calls(tmp_path / 'worker0' / 'calls.jsonl')
         ] == ['pip', 'alexnet_jax.main']


def test_tpu_pod_a_failed_copy_stops_before_running_anything(tmp_path):
  _, env = _tpu_pod(tmp_path, tpu='another-tpu')  # the stand-in refuses my-tpu
  proc = subprocess.run(
      ['bash', TPU_SCRIPT, 'my-tpu', 'us-central2-b', 'configs/pod.py', 'gs://b/r'], cwd=tmp_path,
      env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and 'unsupported command' in proc.stderr
  assert [c[3] for c in _calls(tmp_path / 'gcloud_calls.jsonl')] == ['scp']


# ----------------------------------------------------------------------------------------------
# SLURM: the GPUs of each task


def _slurm(ntasks, tasks_per_node, localid=0, **extra):
  env = dict(SLURM_JOB_ID='1234', SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(localid),
             SLURM_LOCALID=str(localid), SLURM_NODEID='0', SLURM_TASKS_PER_NODE=tasks_per_node)
  return dict(env, **extra)


EIGHT_GPUS = '0,1,2,3,4,5,6,7'


def test_one_task_per_node_drives_every_gpu_of_its_node():
  env = _slurm(4, '1(x4)', CUDA_VISIBLE_DEVICES=EIGHT_GPUS)
  assert distributed.slurm_local_devices(env) == list(range(8))


@pytest.mark.parametrize('localid', [0, 5, 7])
def test_one_task_per_gpu_drives_the_gpu_of_its_local_id(localid):
  env = _slurm(32, '8(x4)', localid, CUDA_VISIBLE_DEVICES=EIGHT_GPUS)
  assert distributed.slurm_local_devices(env) == [localid]


def test_one_task_per_gpu_with_one_gpu_bound_to_each_task_drives_that_gpu():
  env = _slurm(32, '8(x4)', 5, CUDA_VISIBLE_DEVICES='5')
  assert distributed.slurm_local_devices(env) == [0]  # the only GPU the task sees


def test_a_layout_that_would_leave_gpus_idle_is_refused_naming_both_fixes():
  env = _slurm(8, '2(x4)', 1, CUDA_VISIBLE_DEVICES=EIGHT_GPUS)
  with pytest.raises(MeshError) as e:
    distributed.slurm_local_devices(env)
  message = str(e.value)
  assert '\n' not in message
  assert '--ntasks-per-node=1' in message and '--ntasks-per-node=8' in message


def test_tasks_bound_to_gpus_of_their_own_drive_all_they_see():
  """--gpus-per-task=2 on a node of 8: each of the 4 tasks sees its own 2 GPUs."""
  env = _slurm(16, '4(x4)', 3, CUDA_VISIBLE_DEVICES='6,7', SLURM_GPUS_ON_NODE='8')
  assert distributed.slurm_local_devices(env) == [0, 1]


def test_two_tasks_sharing_one_gpu_are_refused():
  env = _slurm(2, '2', 1, CUDA_VISIBLE_DEVICES='0', SLURM_GPUS_ON_NODE='1')
  with pytest.raises(MeshError, match='shared or left idle'):
    distributed.slurm_local_devices(env)


def test_a_cpu_job_with_no_gpus_on_its_nodes_leaves_the_choice_to_jax():
  assert distributed.slurm_local_devices(_slurm(4, '2(x2)', 1, SLURM_GPUS_ON_NODE='0')) is None


def test_unreadable_tasks_per_node_is_one_line():
  env = dict(SLURM_NTASKS='4', SLURM_TASKS_PER_NODE='two', SLURM_NODEID='0')
  with pytest.raises(MeshError, match='--ntasks-per-node'):
    distributed._tasks_per_node(env)


@pytest.mark.parametrize('spec,node,tasks', [('8(x4)', 3, 8), ('2,1', 0, 2), ('2,1', 1, 1),
                                             ('2(x2),1', 1, 2), ('2(x2),1', 2, 1), ('4', 0, 4)])
def test_tasks_per_node_reads_slurms_forms(spec, node, tasks):
  env = dict(SLURM_NTASKS='9', SLURM_TASKS_PER_NODE=spec, SLURM_NODEID=str(node))
  assert distributed._tasks_per_node(env) == tasks


def test_tasks_per_node_prefers_the_steps_count_and_falls_back_to_tasks_over_nodes():
  env = dict(SLURM_NTASKS='8', SLURM_TASKS_PER_NODE='8', SLURM_STEP_TASKS_PER_NODE='4(x2)')
  assert distributed._tasks_per_node(env) == 4
  assert distributed._tasks_per_node(dict(SLURM_NTASKS='8', SLURM_STEP_NUM_NODES='4')) == 2


def test_the_layout_of_uneven_nodes_follows_each_nodes_own_count():
  env = _slurm(3, '2,1', CUDA_VISIBLE_DEVICES='0,1', SLURM_NODEID='1')
  assert distributed.slurm_local_devices(env) == [0, 1]  # node 1: one task, both GPUs
  env.update(SLURM_NODEID='0', SLURM_LOCALID='1')
  assert distributed.slurm_local_devices(env) == [1]  # node 0: one task per GPU


@pytest.mark.parametrize(
    'gpus', [{}, dict(CUDA_VISIBLE_DEVICES=''),
             dict(CUDA_VISIBLE_DEVICES='NoDevFiles')])
def test_without_gpus_jax_chooses_the_devices(gpus):
  assert distributed.slurm_local_devices(_slurm(2, '2', **gpus)) is None


def test_slurm_gpus_on_node_counts_where_cuda_visible_devices_is_unset():
  assert distributed.slurm_local_devices(_slurm(4, '1(x4)',
                                                SLURM_GPUS_ON_NODE='8')) == list(range(8))


@pytest.mark.parametrize(
    'env,multi',
    [
        ({}, False),
        (_slurm(2, '2'), True),
        (_slurm(1, '1'), False),  # one task: nothing to coordinate, JAX sees the node's GPUs
        (dict(SLURM_JOB_ID='1', SLURM_NTASKS='4'), False),  # no task id: not a task
        ({distributed.AUTO_VARIABLE: 'auto'}, True),
        ({distributed.AUTO_VARIABLE: 'off'}, False),
        (dict(JAX_COORDINATOR_ADDRESS='h:1'), True),
        (dict(OMPI_COMM_WORLD_SIZE='2'), True),
    ])
def test_multi_host_environment(env, multi):
  assert distributed.multi_host_environment(env) is multi


# ----------------------------------------------------------------------------------------------
# SLURM: the script, with stand-in srun and scontrol

SRUN = r'''#!{python}
"""Stand-in srun: SLURM_NTASKS copies of the command on this one node ("localhost") with the
variables srun gives each task; waits for all, exits with the first failure's status."""
import os, subprocess, sys
n = int(os.environ['SLURM_NTASKS'])
procs = [subprocess.Popen(sys.argv[1:], env=dict(
    os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID='0', SLURM_STEPID='0',
    SLURM_STEP_ID='0', SLURM_STEP_NODELIST='localhost', SLURM_STEP_NUM_NODES='1',
    SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_TASKS_PER_NODE=str(n))) for i in range(n)]
with open({pids!r}, 'w') as f:
  f.write(' '.join(str(p.pid) for p in procs))
statuses = [p.wait() for p in procs]
sys.exit(next((s if s > 0 else 128 - s for s in statuses if s), 0))
'''
SCONTROL = r"""#!/bin/sh
echo "$@" >> {log}
"""

# As tests/test_multiprocess.py: the demo config at sizes that train in seconds (4 steps an epoch).
TINY = [
    '--config.dataset.num_train=64', '--config.dataset.num_val=24',
    '--config.dataset.image_size=72', '--config.model.image_size=67', '--config.model.width=0.0625',
    '--config.batch_size=16', '--config.eval_batch_size=16', '--config.input.workers=0',
    '--config.log_every_steps=1', '--config.mesh.data=-1'
]


def _free_job_id():
  """A job id whose coordinator port (JAX: job id % 4096 + 61440) nobody listens on."""
  start = random.randrange(10**6)
  for job in range(start, start + 4096):
    with socket.socket() as s:
      try:
        s.bind(('', job % 4096 + 61440))
        return str(job)
      except OSError:
        continue
  pytest.skip('no free port in 61440-65535')


def _slurm_job(tmp_path):
  """The stand-ins in ``bin/``, first on the PATH, and the environment of a batch job with
  ``--ntasks=2`` on one node (what sbatch sets), free of what would take other launch paths."""
  stand_ins = tmp_path / 'bin'
  stand_ins.mkdir()
  _executable(stand_ins / 'srun', SRUN.format(python=sys.executable, pids=str(tmp_path / 'pids')))
  _executable(stand_ins / 'scontrol',
              SCONTROL.format(log=shlex.quote(str(tmp_path / 'scontrol.log'))))
  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(('SLURM_', 'JAX_', 'OMPI_', 'TPU_', 'MEGASCALE_')) and k not in (
          'XLA_FLAGS', 'CUDA_VISIBLE_DEVICES', distributed.AUTO_VARIABLE, 'PORT')
  }
  job = _free_job_id()
  # For speed alone: XLA's CPU compiler without its costly optimisations (a quarter of the compile
  # time, for steps that take milliseconds anyway), the compilation cache (the requeued run skips
  # the first's compiles), and the huge-pages tunable already set (no restart, alexnet_jax.host).
  env.update(XLA_FLAGS=XLA_FAST_COMPILE, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jit'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', GLIBC_TUNABLES=host.HUGE_PAGES_TUNABLE)
  env.update(PATH=f'{stand_ins}:{env["PATH"]}', PYTHON=sys.executable, JAX_PLATFORMS='cpu',
             TFDS_DATA_DIR=str(tmp_path / 'data'), SLURM_JOB_ID=job, SLURM_JOBID=job,
             SLURM_NTASKS='2', SLURM_NPROCS='2', SLURM_NNODES='1', SLURM_JOB_NUM_NODES='1',
             SLURM_TASKS_PER_NODE='2', SLURM_JOB_NODELIST='localhost', SLURM_NODELIST='localhost')
  return env, job


@contextlib.contextmanager
def _job(command, env):
  """The script running in a session of its own: whatever happens, nothing of it outlives the
  test (stand-in srun and its tasks included)."""
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    yield proc
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.communicate()


def _read_until(proc, text):
  seen = []
  while not any(text in l for l in seen):
    line = proc.stderr.readline()
    if not line:
      pytest.fail(f'no {text!r} before the end:\n' + ''.join(seen[-40:]))
    seen.append(line)
  return ''.join(seen)


def test_slurm_script_trains_on_every_task_requeues_on_sigterm_and_resumes(tmp_path):
  """The job's first run gets SIGTERM after step 2 (as SLURM sends it at --signal=TERM@120): both
  tasks save the same step, srun exits 75 and the script requeues the job. The requeued job runs
  the same command (same job id, so the same coordinator port): both tasks resume and finish."""
  env, job = _slurm_job(tmp_path)
  workdir = tmp_path / 'work'
  # 3 epochs of 4 steps: the stop lands well before the end (the first epoch's evaluation alone
  # takes seconds), and the requeued run's steps are the first's (compilation cache hits).
  command = ['bash', SLURM_SCRIPT, 'configs/demo.py', str(workdir), *TINY, '--config.num_epochs=3']
  with _job(command, env) as first:
    err = _read_until(first, 'step 2/')
    for task in (tmp_path / 'pids').read_text().split():  # SLURM signals the tasks, not srun
      os.kill(int(task), signal.SIGTERM)
    out, rest = first.communicate(timeout=120)
    err += rest
  assert first.returncode == 75, err[-3000:]
  assert (tmp_path / 'scontrol.log').read_text() == f'requeue {job}\n'
  for p in range(2):
    assert re.search(
        rf'process {p} of 2: 2 local cpu device\(s\) \(ids \d+,\d+\) of 4 in all; '
        r'mesh 2x2 \(data x model\) over 4 devices', err), err[-3000:]
  saved = re.findall(r'stopped by SIGTERM: checkpoint saved at step (\d+)', out + err)
  assert len(saved) == 2 and saved[0] == saved[1], err[-3000:]
  step = int(saved[0])
  assert step < 12 and 'final validation' not in out

  with _job(command, env) as second:
    out, err = second.communicate(timeout=300)
  assert second.returncode == 0, err[-3000:]
  assert err.count(f'restored checkpoint at step {step}') == 2, err[-3000:]
  finals = [l for l in out.splitlines() if l.startswith('final validation')]
  assert len(finals) == 2 and finals[0] == finals[1]  # both tasks, one result
  assert max(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()) == 12
  assert (tmp_path / 'scontrol.log').read_text() == f'requeue {job}\n'  # not again


def test_slurm_script_refuses_a_layout_leaving_gpus_idle_in_one_line_per_task(tmp_path):
  """Two tasks on a node whose 8 GPUs each task sees: both stop at start-up, before JAX starts, with
  one line naming both fixes; no requeue."""
  env, _ = _slurm_job(tmp_path)
  env['CUDA_VISIBLE_DEVICES'] = EIGHT_GPUS
  command = ['bash', SLURM_SCRIPT, 'configs/demo.py', str(tmp_path / 'work'), *TINY]
  with _job(command, env) as proc:
    _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, err[-3000:]
  errors = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(errors) == 2 and all(
      '--ntasks-per-node=1' in e and '--ntasks-per-node=8' in e for e in errors), err[-3000:]
  assert 'Traceback' not in err and not (tmp_path / 'scontrol.log').exists()
