"""Workdirs on object storage: every writer (checkpoints, the JSONL metrics, TensorBoard, the
training curves, the visualisations) goes through one file-system layer, ``alexnet_jax.storage``
(etils epath), tested on local paths and on ``gs://`` served by a fake Google Cloud Storage.

The fake replaces the storage, not our code nor the libraries': epath's own gs:// backend (fsspec)
is handed a file system over a dict of objects, and tensorstore, which orbax writes and reads the
arrays with, talks to an HTTP server speaking the part of the GCS JSON API it uses
(``TENSORSTORE_GCS_HTTP_URL``), over the same dict. Like GCS, the fake has no directories, no
appending and no rename. The one call left out is orbax's bucket lookup through
google-cloud-storage (is the bucket hierarchical?), answered "no" as for a plain bucket."""

import http.server
import importlib
import importlib.util
import io
import itertools
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.parse

import flax
import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from alexnet_jax import checkpointing, cli, host, metrics, storage, trained
from alexnet_jax.configs import base_config
from alexnet_jax.data import statistics
from alexnet_jax.errors import DirectoryError
from alexnet_jax.visualize import checkpoints as visualize_checkpoints
from alexnet_jax.visualize import commands, render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- a fake Google Cloud Storage ---------------------------------------------------------------


class Objects:
  """Every bucket's objects: ``'bucket/name'`` → ``(bytes, generation)``."""

  def __init__(self):
    self._lock = threading.Lock()
    self._data = {}
    self._generations = itertools.count(1)

  def clear(self):
    with self._lock:
      self._data.clear()

  def get(self, name):
    with self._lock:
      return self._data.get(name)

  def put(self, name, data, if_generation_match=None):
    """The new generation, or None when ``if_generation_match`` (0: absent) does not hold."""
    with self._lock:
      current = self._data.get(name)
      if if_generation_match is not None and (current[1] if current else 0) != if_generation_match:
        return None
      generation = next(self._generations)
      self._data[name] = (bytes(data), generation)
      return generation

  def delete(self, name, if_generation_match=None):
    with self._lock:
      current = self._data.get(name)
      if current is None:
        return 'missing'
      if if_generation_match is not None and current[1] != if_generation_match:
        return 'precondition'
      del self._data[name]
      return 'deleted'

  def names(self, prefix=''):
    with self._lock:
      return sorted(n for n in self._data if n.startswith(prefix))


class _Upload(io.BytesIO):
  """A file being written: the object appears whole when it is closed, as on GCS."""

  def __init__(self, objects, name):
    super().__init__()
    self._objects, self._name = objects, name

  def close(self):
    if not self.closed:
      self._objects.put(self._name, self.getvalue())
    super().close()


class FakeGCSFileSystem(fsspec.AbstractFileSystem):
  """What gcsfs is to epath, over ``Objects``: a directory is a prefix of object names, an
  object is read or written whole ('rb', 'wb': gcsfs has no append either)."""
  protocol = ('gs', 'gcs')
  root_marker = ''
  cachable = False
  objects = None  # set by the fixture

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs's option
    super().__init__(*args, **kwargs)

  def _entry(self, name):
    found = self.objects.get(name)
    if found is not None:
      return dict(name=name, type='file', size=len(found[0]))
    return dict(name=name, type='directory', size=0)

  def ls(self, path, detail=True, **kwargs):
    path = self._strip_protocol(path)
    if self.objects.get(path) is not None:
      entries = [self._entry(path)]
    else:
      prefix = f'{path}/' if path else ''
      children = sorted(
          {prefix + n[len(prefix):].split('/')[0] for n in self.objects.names(prefix)})
      if not children and '/' in path:
        raise FileNotFoundError(path)
      entries = [self._entry(c) for c in children]
    return entries if detail else [e['name'] for e in entries]

  def info(self, path, **kwargs):
    path = self._strip_protocol(path)
    if self.objects.get(path) is not None:
      return self._entry(path)
    if '/' not in path or self.objects.names(path + '/'):  # a bucket, or a prefix of objects
      return dict(name=path, type='directory', size=0)
    raise FileNotFoundError(path)

  def _open(self, path, mode='rb', **kwargs):
    path = self._strip_protocol(path)
    if mode == 'rb':
      found = self.objects.get(path)
      if found is None:
        raise FileNotFoundError(path)
      return io.BytesIO(found[0])
    if mode == 'wb':
      return _Upload(self.objects, path)
    raise NotImplementedError(f'File mode not supported: {mode}')

  def cp_file(self, path1, path2, **kwargs):
    found = self.objects.get(self._strip_protocol(path1))
    if found is None:
      raise FileNotFoundError(path1)
    self.objects.put(self._strip_protocol(path2), found[0])

  def _rm(self, path):
    self.objects.delete(self._strip_protocol(path))  # a "directory": nothing to delete

  def mkdir(self, path, create_parents=True, **kwargs):
    pass

  def makedirs(self, path, exist_ok=False):
    pass

  def rmdir(self, path):
    pass


class _JsonApi(http.server.BaseHTTPRequestHandler):
  """The requests tensorstore's ``gcs`` kvstore makes: media uploads, reads (ranges and
  generation conditions), listings and deletions."""
  objects = None
  requests = []

  def log_message(self, *args):
    pass

  def _send(self, status, body=b'', headers=()):
    self.send_response(status)
    for k, v in headers:
      self.send_header(k, v)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status, obj):
    self._send(status, json.dumps(obj).encode(), [('Content-Type', 'application/json')])

  @staticmethod
  def _metadata(bucket, name, data, generation):
    return dict(kind='storage#object', bucket=bucket, name=name, size=str(len(data)),
                generation=str(generation), metageneration='1',
                timeCreated='2024-01-01T00:00:00.000Z', updated='2024-01-01T00:00:00.000Z')

  def _request(self):
    url = urllib.parse.urlsplit(self.path)
    self.requests.append((self.command, url.path))
    return url.path.split('/'), {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}

  def do_GET(self):
    parts, q = self._request()  # /storage/v1/b/{bucket}/o[/{name}]
    if parts[1:4] != ['storage', 'v1', 'b'] or len(parts) < 6 or parts[5] != 'o':
      return self._send(501)
    bucket = parts[4]
    if len(parts) == 6:
      prefix = f'{bucket}/{q.get("prefix", "")}'
      items = [
          self._metadata(bucket, n[len(bucket) + 1:], *self.objects.get(n))
          for n in self.objects.names(prefix)
          if q.get('startOffset', '') <= n[len(bucket) + 1:] and
          ('endOffset' not in q or n[len(bucket) + 1:] < q['endOffset'])
      ]
      return self._json(200, dict(kind='storage#objects', items=items))
    name = urllib.parse.unquote(parts[6])
    found = self.objects.get(f'{bucket}/{name}')
    if found is None:
      return self._json(404, dict(error=dict(code=404, message='Not Found')))
    data, generation = found
    if 'ifGenerationMatch' in q and int(q['ifGenerationMatch']) != generation:
      return self._json(412, dict(error=dict(code=412, message='Precondition Failed')))
    if 'ifGenerationNotMatch' in q and int(q['ifGenerationNotMatch']) == generation:
      return self._send(304)
    if q.get('alt') != 'media':
      return self._json(200, self._metadata(bucket, name, data, generation))
    headers = [('x-goog-generation', str(generation)), ('Content-Type', 'application/octet-stream')]
    if not self.headers.get('Range'):
      return self._send(200, data, headers)
    first, _, last = self.headers['Range'].removeprefix('bytes=').partition('-')
    if first == '':
      first, last = max(len(data) - int(last), 0), len(data) - 1
    else:
      first, last = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
    headers.append(('Content-Range', f'bytes {first}-{last}/{len(data)}'))
    return self._send(206, data[first:last + 1], headers)

  def do_POST(self):
    parts, q = self._request()  # /upload/storage/v1/b/{bucket}/o?uploadType=media&name=...
    body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
    if parts[1:5] != ['upload', 'storage', 'v1', 'b'] or q.get('uploadType') != 'media':
      return self._send(501)
    bucket, name = parts[5], q['name']
    match = int(q['ifGenerationMatch']) if 'ifGenerationMatch' in q else None
    generation = self.objects.put(f'{bucket}/{name}', body, match)
    if generation is None:
      return self._json(412, dict(error=dict(code=412, message='Precondition Failed')))
    return self._json(200, self._metadata(bucket, name, body, generation))

  def do_DELETE(self):
    parts, q = self._request()
    match = int(q['ifGenerationMatch']) if 'ifGenerationMatch' in q else None
    result = self.objects.delete(f'{parts[4]}/{urllib.parse.unquote(parts[6])}', match)
    return self._send(dict(deleted=204, missing=404, precondition=412)[result])

  def do_PUT(self):
    self._request()
    return self._send(501)


@pytest.fixture(scope='module')
def _server():
  objects = Objects()
  _JsonApi.objects = objects
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _JsonApi)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield objects, f'http://127.0.0.1:{server.server_port}'
  server.shutdown()
  server.server_close()


@pytest.fixture
def gcs(_server, monkeypatch, tmp_path):
  """``gs://`` served by the fake, in an empty current directory (where a local "gs:" directory
  would appear); yields the objects."""
  objects, url = _server
  objects.clear()
  _JsonApi.requests.clear()
  FakeGCSFileSystem.objects = objects
  registry = importlib.import_module('fsspec.registry')._registry
  for protocol in FakeGCSFileSystem.protocol:
    monkeypatch.setitem(registry, protocol, FakeGCSFileSystem)
  monkeypatch.setenv('EPATH_USE_TF', 'false')  # epath would take TensorFlow's gfile if installed
  gpath._is_tf_installed.cache_clear()
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', url)
  monkeypatch.setenv('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'fake')
  monkeypatch.setattr(gcs_utils, 'get_bucket',
                      lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  clear = epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear  # epath keeps one
  clear()
  yield objects
  clear()
  gpath._is_tf_installed.cache_clear()
  assert os.listdir(cwd) == [], 'a gs:// path was written as a local one'


# -- reading what was written ------------------------------------------------------------------


def _events(data: bytes):
  """The ``Event`` protos of an event file, each record's framing and checksums verified."""
  events, at = [], 0
  while at < len(data):
    header = data[at:at + 8]
    (length,) = struct.unpack('<Q', header)
    assert struct.unpack('<I', data[at + 8:at + 12])[0] == masked_crc32c(header)
    record = data[at + 12:at + 12 + length]
    assert struct.unpack('<I', data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(record)
    events.append(event_pb2.Event.FromString(record))
    at += 16 + length
  return events


def _tags(events):
  return {v.tag for e in events for v in e.summary.value}


def _png(data: bytes) -> np.ndarray:
  assert data.startswith(b'\x89PNG')
  return np.asarray(Image.open(io.BytesIO(data)))


ROWS = [(2, 'train', dict(epoch=0.5, loss=2.0, top1_error=0.9, top5_error=0.5, learning_rate=0.01)),
        (4, 'train', dict(epoch=1.0, loss=1.5, top1_error=0.8, top5_error=0.4, learning_rate=0.01)),
        (4, 'val', dict(epoch=1, loss=1.6, top1_error=0.85, top5_error=0.45))]


def _write(writer, rows=ROWS):
  for step, split, values in rows:
    writer.write(step, split, values)


def _expected(rows=ROWS):
  return [dict(step=s, split=split, **v) for s, split, v in rows]


# -- local paths: as before --------------------------------------------------------------------


def test_a_local_workdir_is_written_in_place(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  writer = metrics.MetricWriter('run')  # relative, as a user may give it
  _write(writer)
  # Appended line by line, readable while the run goes on; no staging directory.
  assert metrics.read_jsonl('run/metrics.jsonl') == _expected()
  writer.image(4, 'visualize/filters', np.zeros((8, 8, 3), np.uint8))
  writer.close()
  events = os.listdir('run/tensorboard')
  assert len(events) == 1
  tags = _tags(_events(pathlib.Path('run/tensorboard', events[0]).read_bytes()))
  assert {'train/loss', 'val/top1_error', 'visualize/filters'} <= tags
  assert metrics.plot_training_curves('run') == 'run/training_curves.png'
  assert _png(pathlib.Path('run/training_curves.png').read_bytes()).ndim == 3
  assert sorted(os.listdir('run')) == ['metrics.jsonl', 'tensorboard', 'training_curves.png']
  cfg = base_config().checkpoint
  manager = checkpointing.make_manager('run/checkpoints', cfg)
  assert manager.directory == epath.Path(tmp_path / 'run' / 'checkpoints')  # made absolute
  manager.close()
  assert metrics.plot_training_curves('elsewhere') is None


# -- gs:// -------------------------------------------------------------------------------------


def test_metrics_on_gs_are_uploaded_whole_and_read_back(gcs):
  writer = metrics.MetricWriter('gs://bkt/run')
  staging = writer._staging  # pylint: disable=protected-access
  _write(writer)
  assert gcs.names() == []  # within SYNC_SECONDS of the start: nothing uploaded yet
  writer.sync()
  assert metrics.read_jsonl('gs://bkt/run/metrics.jsonl') == _expected()
  writer.image(4, 'visualize/filters', np.full((8, 8, 3), 200, np.uint8))
  writer.close()
  assert not os.path.exists(staging)
  (event_file,) = gcs.names('bkt/run/tensorboard/')
  tags = _tags(_events(gcs.get(event_file)[0]))
  assert {'train/loss', 'train/learning_rate', 'val/top1_error', 'visualize/filters'} <= tags

  # A resumed run appends to the history; its events go to a new file, as they do locally (named
  # by the second it starts in and the host).
  second = int(time.time())
  while int(time.time()) == second:
    time.sleep(0.05)
  writer = metrics.MetricWriter('gs://bkt/run')
  later = [(6, 'train',
            dict(epoch=1.5, loss=1.2, top1_error=0.7, top5_error=0.3, learning_rate=0.005))]
  _write(writer, later)
  writer.close()
  assert metrics.read_jsonl('gs://bkt/run/metrics.jsonl') == _expected(ROWS + later)
  assert len(gcs.names('bkt/run/tensorboard/')) == 2

  assert metrics.plot_training_curves('gs://bkt/run') == 'gs://bkt/run/training_curves.png'
  assert _png(gcs.get('bkt/run/training_curves.png')[0]).ndim == 3


def test_metrics_on_gs_are_uploaded_when_due(gcs, monkeypatch):
  monkeypatch.setattr(metrics, 'SYNC_SECONDS', 0.0)
  writer = metrics.MetricWriter('gs://bkt/run')
  for i, row in enumerate(ROWS):
    _write(writer, [row])
    assert metrics.read_jsonl('gs://bkt/run/metrics.jsonl') == _expected(ROWS[:i + 1])
    for name in gcs.names('bkt/run/tensorboard/'):
      _events(gcs.get(name)[0])  # whole records only, whatever tensorboardX's thread was doing
  writer.close()


def test_a_failed_upload_is_raised_as_it_is_and_the_metrics_are_kept(gcs, monkeypatch):
  """The storage's failure is not bad input: it reaches the training loop with its traceback."""

  def refuse(self, path, mode='rb', **kwargs):
    raise PermissionError(f'403 Forbidden: {path}')

  writer = metrics.MetricWriter('gs://bkt/run')
  _write(writer)
  monkeypatch.setattr(FakeGCSFileSystem, '_open', refuse)
  with pytest.raises(PermissionError, match='403 Forbidden: bkt/run/metrics.jsonl'):
    writer.close()
  kept = writer._staging  # pylint: disable=protected-access
  assert sorted(os.listdir(kept)) == ['metrics.jsonl', 'tensorboard']
  shutil.rmtree(kept)


def _crc32c_bitwise(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) bit by bit: independent of the
  table-driven one tensorboardX ships."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_an_event_file_holds_whole_checksummed_records_while_it_is_open(tmp_path):
  assert _crc32c_bitwise(b'123456789') == 0xE3069283  # the standard check value
  events = metrics.EventFile(str(tmp_path / 'tb'))
  picture = np.random.default_rng(0).integers(0, 256, (6, 5, 3)).astype(np.uint8)
  events.scalar('train/loss', 2.5, 7)
  events.image('visualize/filters', picture, 7)
  data = pathlib.Path(events.path).read_bytes()  # as TensorBoard reads it during the run
  at, read = 0, []
  while at < len(data):
    header = data[at:at + 8]
    (length,) = struct.unpack('<Q', header)
    record = data[at + 12:at + 12 + length]
    assert struct.unpack('<I', data[at + 8:at + 12])[0] == _masked(_crc32c_bitwise(header))
    assert struct.unpack('<I', data[at + 12 + length:at + 16 + length])[0] == _masked(
        _crc32c_bitwise(record))
    read.append(event_pb2.Event.FromString(record))
    at += 16 + length
  assert at == len(data) and read[0].file_version == 'brain.Event:2'
  (loss,), (image,) = read[1].summary.value, read[2].summary.value
  assert (loss.tag, loss.simple_value, read[1].step) == ('train/loss', 2.5, 7)
  assert image.tag == 'visualize/filters' and read[2].step == 7
  np.testing.assert_array_equal(_png(image.image.encoded_image_string), picture)
  events.close()
  assert os.path.basename(events.path).startswith('events.out.tfevents.')


def test_visualisations_on_gs_are_the_bytes_a_local_folder_gets(gcs, tmp_path):
  local = str(tmp_path / 'local_out')
  image = np.random.default_rng(0).integers(0, 256, (12, 10, 3)).astype(np.uint8)
  for out in ('gs://bkt/out', local):
    render.save_png(os.path.join(out, 'filters.png'), image)
    fig, ax = render.subplots(1, 1, figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    render.save_figure(fig, os.path.join(out, 'curve.png'))
    commands._npz(out, 'filters.npz', filters=image)  # pylint: disable=protected-access
    render.record(out, 'filters', [('filters.png', 'The filters.')], ['filters.npz'])
    render.record(out, 'invariance', [('curve.png', 'A curve.')], [])
    render.record(out, 'filters', [('filters.png', 'The filters, again.')], ['filters.npz'])
  remote = {n.split('/')[-1]: gcs.get(n)[0] for n in gcs.names('bkt/out/')}
  written = ['curve.png', 'filters.npz', 'filters.png', 'index.html', 'index.json']
  assert sorted(remote) == sorted(os.listdir(local)) == written
  for name in ('filters.png', 'index.html', 'index.json'):
    assert remote[name] == pathlib.Path(local, name).read_bytes(), name
  np.testing.assert_array_equal(_png(remote['filters.png']), image)
  assert _png(remote['curve.png']).ndim == 3
  np.testing.assert_array_equal(np.load(io.BytesIO(remote['filters.npz']))['filters'], image)
  manifest = json.loads(remote['index.json'])
  assert [e['analysis'] for e in manifest] == ['invariance', 'filters']
  assert manifest[1]['figures'] == [dict(file='filters.png', caption='The filters, again.')]
  assert b'The filters, again.' in remote['index.html'] and b'A curve.' in remote['index.html']


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: dict
  rng: jax.Array
  batch_stats: dict


def _state(seed):
  rng = np.random.default_rng(seed)
  return _State(step=jnp.array(seed, jnp.int32),
                params=dict(w=jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)),
                opt_state=dict(mu=jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)),
                rng=jax.random.PRNGKey(seed), batch_stats={})


def test_checkpoints_on_gs_go_through_tensorstore_and_back(gcs):
  cfg = base_config().checkpoint
  cfg.update(keep=2, keep_best=False, async_save=False, keep_epochs=())
  manager = checkpointing.make_manager('gs://bkt/run/checkpoints', cfg)
  assert str(manager.directory) == 'gs://bkt/run/checkpoints'  # not made "absolute" locally
  for step in (1, 2, 3):
    checkpointing.save(manager, step, _state(step), dict(epoch=step))
  checkpointing.wait(manager)
  manager.close()
  # The arrays went through tensorstore's gcs driver, the rest through epath; step 1 was deleted
  # by retention.
  assert ('POST', '/upload/storage/v1/b/bkt/o') in _JsonApi.requests
  steps = {n.split('/')[3] for n in gcs.names('bkt/run/checkpoints/')}
  assert steps == {'2', '3'}

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          _state(0))
  manager = checkpointing.make_manager('gs://bkt/run/checkpoints', cfg)
  restored = checkpointing.restore_latest(manager, abstract)
  assert restored.step == 3 and restored.meta['epoch'] == 3
  np.testing.assert_array_equal(restored.state.params['w'], _state(3).params['w'])

  # A damaged newest checkpoint is moved aside on the bucket, and the one before restored.
  gcs.put('bkt/run/checkpoints/3/meta/metadata', b'{"epoch": 3, "ste')
  restored = checkpointing.restore_latest(manager, abstract)
  assert restored.step == 2 and manager.all_steps() == [2]
  manager.close()
  assert gcs.names('bkt/run/checkpoints/3/') == []
  moved = gcs.names('bkt/run/damaged_checkpoints/3/')
  assert 'bkt/run/damaged_checkpoints/3/meta/metadata' in moved and len(moved) > 5

  # What the visualisations read.
  assert trained.checkpoint_directory('gs://bkt/run') == 'gs://bkt/run/checkpoints'
  assert visualize_checkpoints.checkpoint_steps(None, 'gs://bkt/run') == [2]


# -- the command line --------------------------------------------------------------------------


def test_urls_are_checked_before_a_run_starts(gcs, monkeypatch):
  monkeypatch.setitem(storage.SCHEMES['gs'], 'modules', ())  # the fake stands in for both
  cli.writable_directory('gs://bkt/run', '--workdir')  # taken, nothing created
  assert gcs.names() == []
  with pytest.raises(DirectoryError,
                     match=r'--workdir=gs:/bkt/run is a local path .* gs://bkt/run'):
    cli.writable_directory('gs:/bkt/run', '--workdir')
  for url in ('s3://bkt/run', 'file:///tmp/run'):
    with pytest.raises(DirectoryError, match='is not a storage this program writes to'):
      cli.writable_directory(url, '--out')
  monkeypatch.setitem(storage.SCHEMES['gs'], 'modules',
                      (('no_such_module_xyz', 'google-cloud-storage'),))
  with pytest.raises(
      DirectoryError, match=r"needs google-cloud-storage, not installed; install "
      r"the gcs extra: pip install 'alexnet_jax\[gcs\]'"):
    cli.writable_directory('gs://bkt/run', '--workdir')


def _installed(module):
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


@pytest.mark.skipif(
    _installed('gcsfs') and _installed('google.cloud.storage'), reason='the gcs extra is installed')
def test_a_gs_workdir_without_the_extra_fails_in_one_line(tmp_path):
  env = dict(host.environ_with_huge_pages(os.environ), JAX_PLATFORMS='cpu', EPATH_USE_TF='false',
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
  demo = os.path.join(REPO, 'configs', 'demo.py')
  proc = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main', f'--config={demo}', '--workdir=gs://bucket/x'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert errors == [
      'error: --workdir=gs://bucket/x: gs:// needs gcsfs, google-cloud-storage, not installed; '
      "install the gcs extra: pip install 'alexnet_jax[gcs]' (in a checkout: pip install -e "
      "'.[gcs]')"
  ], proc.stderr[-3000:]
  assert os.listdir(tmp_path) == []  # no local "gs:" directory


def test_statistics_of_a_gs_data_set_are_stored_beside_it_once(gcs, monkeypatch):
  """A TFDS set read from gs:// (data_dir=gs://...) gets its mean image and RGB PCA computed once
  and stored on the bucket: a restart loads them instead of another pass over the set."""
  location = 'gs://bkt/tfds/shapes/1.0.0'
  source = types.SimpleNamespace(info=types.SimpleNamespace(location=location))
  path = statistics.path_for(source)
  assert path == f'{location}/alexnet_jax_{statistics.FILENAME}'
  stats = statistics.neutral(8, (120.0, 110.0, 100.0), (60.0, 50.0, 40.0))
  passes = []
  monkeypatch.setattr(statistics, 'compute', lambda *a, **k: passes.append(1) or stats)
  first = statistics.ensure(source, 8, progress=False)
  assert gcs.names('bkt/tfds/shapes/1.0.0/') == [
      f'bkt/tfds/shapes/1.0.0/alexnet_jax_'
      f'{statistics.FILENAME}'
  ]
  again = statistics.ensure(source, 8, progress=False)
  assert passes == [1]  # the second start loaded them
  for a, b in ((first, stats), (again, stats)):
    np.testing.assert_array_equal(a.mean_image, b.mean_image)
    np.testing.assert_array_equal(a.eigvecs, b.eigvecs)
