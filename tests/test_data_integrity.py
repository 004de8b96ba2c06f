"""Data that must never turn into wrong numbers (issue 11): symlink loops, 16-bit images, empty
class folders, impossible prepare flags, damaged shards. Real files throughout."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from alexnet_jax import configs, errors
from alexnet_jax.data import builtin, catalog, prepare, records, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def _image(path, value=0, size=(8, 8)):
  Image.new('RGB', size, (value, value, value)).save(path)


# ---------------------------------------------------------------------------
# Symlinks: loops are walked once, each real file counted once
# ---------------------------------------------------------------------------


def test_symlink_loop_lists_each_file_once(tmp_path):
  root, elsewhere = tmp_path / 'root', tmp_path / 'elsewhere'
  (root / 'cat' / 'sub').mkdir(parents=True)
  for i in range(3):
    _image(root / 'cat' / f'{i}.png')
  for i in range(2):
    _image(root / 'cat' / 'sub' / f's{i}.png')
  os.symlink('..', root / 'cat' / 'sub' / 'loop')  # back to cat: a loop
  os.symlink('0.png', root / 'cat' / 'alias.png')  # a second path to a listed file
  # dog's images live elsewhere: its class folder and a subfolder of it are links, followed.
  (elsewhere / 'dog_images').mkdir(parents=True)
  (elsewhere / 'more').mkdir()
  for i in range(4):
    _image(elsewhere / 'dog_images' / f'{i}.png')
  _image(elsewhere / 'more' / 'm.png')
  os.symlink(elsewhere / 'dog_images', root / 'dog')
  os.symlink(elsewhere / 'more', elsewhere / 'dog_images' / 'more')

  class_names, files = sources.list_class_folder(str(root))
  assert class_names == ['cat', 'dog']
  assert files == [('cat/0.png', 0), ('cat/1.png', 0), ('cat/2.png', 0), ('cat/sub/s0.png', 0),
                   ('cat/sub/s1.png', 0), ('dog/0.png', 1), ('dog/1.png', 1), ('dog/2.png', 1),
                   ('dog/3.png', 1), ('dog/more/m.png', 1)]
  folder = sources.scan_class_folder(str(root))
  assert folder.files == files
  assert folder.repeated_files == [('cat/alias.png', 'cat/0.png')]
  assert folder.repeated_folders == ['cat/sub/loop']
  # prepare plans every real file once, and says what it counted once.
  plan = prepare.make_plan(str(root), name='x', val_fraction=0.0, val_dir=None, image_size=8,
                           jpeg_quality=90, examples_per_shard=100, seed=0, max_pixels=10**6)
  assert sum(len(s['files']) for s in plan['splits']['train']) == 10
  assert plan['counted_once']['source'] == dict(
      files=[dict(file='cat/alias.png', same_as='cat/0.png')], folders=['cat/sub/loop'])


def test_links_above_root_second_links_and_hard_links_count_once(tmp_path):
  root = tmp_path / 'root'
  (root / 'cat' / 'sub').mkdir(parents=True)
  _image(root / 'cat' / 'a.png')
  _image(root / 'cat' / 'sub' / 'b.png')
  os.symlink('../..', root / 'cat' / 'up')  # the folder above root: walking it revisits root
  os.symlink('sub', root / 'cat' / 'again')  # sorts before the real folder, which still wins
  os.link(root / 'cat' / 'a.png', root / 'cat' / 'hard.png')
  os.symlink('missing.png', root / 'cat' / 'dangling.png')  # listed: reported when read
  assert sources.list_class_folder(str(root))[1] == [('cat/a.png', 0), ('cat/dangling.png', 0),
                                                     ('cat/sub/b.png', 0)]
  folder = sources.scan_class_folder(str(root))
  assert folder.file_ids[1] is None
  assert folder.repeated_files == [('cat/hard.png', 'cat/a.png')]
  assert sorted(folder.repeated_folders) == ['cat/again', 'cat/up']


@pytest.mark.parametrize('link, target, message', [
    ('cat/dogs', '../dog', 'two labels'),
    ('cat/d.png', '../dog/d.png', 'two labels'),
    ('kitty', 'cat', "same folder as 'cat'"),
    ('all', '.', 'or a folder above it'),
])
def test_a_folder_or_file_in_two_classes_is_refused(tmp_path, link, target, message):
  root = tmp_path / 'root'
  for name in ('cat', 'dog'):
    (root / name).mkdir(parents=True)
    _image(root / name / f'{name[0]}.png')
  os.symlink(target, root / link)
  with pytest.raises(errors.DatasetNotFoundError, match=message) as info:
    sources.list_class_folder(str(root))
  assert '\n' not in str(info.value)


def test_val_dir_sharing_files_with_source_is_refused(tmp_path):
  root, val = tmp_path / 'root', tmp_path / 'val'
  (root / 'cat').mkdir(parents=True)
  (val / 'cat').mkdir(parents=True)
  _image(root / 'cat' / 'a.png')
  _image(root / 'cat' / 'b.png')
  os.symlink(root / 'cat' / 'b.png', val / 'cat' / 'b.png')
  (val / 'dog_unused').mkdir()  # an empty validation class is harmless, but not in --source
  with pytest.raises(errors.PrepareError, match='dog_unused'):
    prepare.prepare(str(root), 'v', data_dir=str(tmp_path / 'out'), val_dir=str(val))
  os.rmdir(val / 'dog_unused')
  with pytest.raises(errors.PrepareError, match='must not be trained on'):
    prepare.prepare(str(root), 'v', data_dir=str(tmp_path / 'out'), val_dir=str(val))
  assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------
# 16-bit images are scaled, not clipped
# ---------------------------------------------------------------------------

VALUES16 = np.array([0, 128, 129, 257, 383, 32768, 65280, 65535], np.uint16)


def _expected8(v):
  return np.rint(v.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _samples16(channels, seed=0):
  """(4, 8, channels) uint16: the edge values in row 0, random ones below."""
  rng = np.random.default_rng(seed)
  v = rng.integers(0, 65536, (4, 8, channels)).astype(np.uint16)
  v[0] = VALUES16[:, None]
  return v


def _png16(path, samples, colour_type):
  """A 16-bit PNG written by hand (PIL writes 16 bits only for greyscale), every row with the
  Sub filter, which depends on the bytes per pixel."""
  h, w = samples.shape[:2]
  pixels = samples.astype('>u2').view(np.uint8).reshape(h, w, -1)
  sub = pixels.copy()
  sub[:, 1:] = pixels[:, 1:] - pixels[:, :-1]  # modulo 256

  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I',
                        zlib.crc32(kind + data) & 0xffffffff))

  raw = b''.join(b'\x01' + row.tobytes() for row in sub)
  header = struct.pack('>IIBBBBB', w, h, 16, colour_type, 0, 0, 0)
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw)) +
            chunk(b'IEND', b''))


def _write16(path, kind):
  """Writes a real 16-bit file of ``kind``; returns its expected uint8 RGB pixels."""
  if kind in ('png I;16', 'tiff I;16B', 'pgm'):
    grey = _samples16(1)[..., 0]
    if kind == 'png I;16':
      Image.fromarray(grey).save(path, format='PNG')
    elif kind == 'tiff I;16B':
      Image.frombytes('I;16B', grey.shape[::-1],
                      grey.astype('>u2').tobytes()).save(path, format='TIFF')
    else:
      Image.fromarray(grey).save(path, format='PPM')  # PIL opens 16-bit PGMs in mode 'I'
    return np.repeat(_expected8(grey)[..., None], 3, axis=-1)
  colour_type, channels = {'png RGB': (2, 3), 'png RGBA': (6, 4), 'png LA': (4, 2)}[kind]
  samples = _samples16(channels)
  _png16(path, samples, colour_type)
  rgb = samples[..., :3] if channels >= 3 else np.repeat(samples[..., :1], 3, axis=-1)
  return _expected8(rgb)


KINDS16 = {
    'png I;16': 'I;16',
    'tiff I;16B': 'I;16B',
    'pgm': 'I',
    'png RGB': 'RGB',
    'png RGBA': 'RGBA',
    'png LA': 'RGBA'  # PIL opens 16-bit grey+alpha PNGs as RGBA
}


@pytest.mark.parametrize('kind', list(KINDS16))
def test_16bit_images_are_scaled_to_8_bits(tmp_path, kind):
  root = tmp_path / 'folder'
  (root / 'c').mkdir(parents=True)
  path = str(root / 'c' / 'image')
  expected = _write16(path, kind)
  with Image.open(path) as img:
    assert img.mode == KINDS16[kind]  # the mode this case is about
    np.testing.assert_array_equal(np.asarray(records.load_rgb(img)), expected)
  with open(path, 'rb') as f:
    np.testing.assert_array_equal(records.decode_image_bytes(f.read()), expected)
  np.testing.assert_array_equal(sources.FolderImageSource(str(root))[0]['image'], expected)


def test_prepare_stores_16bit_greyscale_scaled(tmp_path):
  path = str(tmp_path / 'grey16.png')
  Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(path)  # half scale: 128, not 255
  result = prepare.process_file((path, 0, 32, 95, 10**6, 'jpeg'))
  assert result[0] == 'ok'
  assert np.abs(result[2].astype(int) - 128).max() <= 1


@pytest.mark.parametrize('array, message', [
    (np.full((4, 4), 0.5, np.float32), 'float'),
    (np.full((4, 4), 70000, np.int32), 'outside the 16-bit range'),
])
def test_pixels_without_a_known_range_are_bad_records(array, message):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='TIFF')
  with pytest.raises(records.CorruptRecordError, match=message):
    records.decode_image_bytes(buf.getvalue())


# ---------------------------------------------------------------------------
# Empty class folders are refused
# ---------------------------------------------------------------------------


def test_empty_class_folders_are_refused(tmp_path):
  root = tmp_path / 'root'
  for name in ('bird', 'cat', 'dog'):
    (root / name).mkdir(parents=True)
  _image(root / 'cat' / 'a.png')
  (root / 'bird' / '.DS_Store').write_text('hidden files do not count')
  (root / 'dog' / 'sub').mkdir()  # a subfolder without files is no image either
  for call in (lambda: sources.list_class_folder(str(root)),
               lambda: sources.FolderImageSource(str(root)),
               lambda: prepare.prepare(str(root), 'e', data_dir=str(tmp_path / 'out'))):
    with pytest.raises(errors.DatasetNotFoundError, match='2 class folder') as info:
      call()
    message = str(info.value)
    assert 'bird, dog' in message and str(root) in message and '\n' not in message
  assert not (tmp_path / 'out').exists()
  folder = sources.scan_class_folder(str(root), allow_empty_classes=True)
  assert folder.class_names == ['bird', 'cat', 'dog'] and folder.files == [('cat/a.png', 1)]


def test_a_class_without_readable_images_is_reported(tmp_path):
  root = tmp_path / 'root'
  for name in ('cat', 'dog'):
    (root / name).mkdir(parents=True)
  _image(root / 'cat' / 'a.png')
  (root / 'dog' / 'b.png').write_bytes(b'not an image')
  directory = prepare.prepare(str(root), 'u', data_dir=str(tmp_path / 'out'), val_fraction=0.0,
                              workers=0, progress=False)
  report = json.load(open(os.path.join(directory, prepare.REPORT)))
  assert report['classes_without_training_images'] == ['dog'] and report['num_skipped'] == 1


# ---------------------------------------------------------------------------
# prepare's numeric flags are checked before anything is written
# ---------------------------------------------------------------------------

# The flag → (lowest, highest) accepted values (None: no limit) of every numeric flag.
FLAG_RANGES = dict(image_size=(1, 65_500), jpeg_quality=(1, 100), examples_per_shard=(1, None),
                   workers=(0, None), seed=(0, None), max_pixels=(1, None),
                   val_fraction=(0.0, None))
DEFAULTS = dict(image_size=8, jpeg_quality=90, examples_per_shard=4, workers=0, seed=0,
                max_pixels=10**6, val_fraction=None, val_dir=None)


def _out_of_range():
  for flag, (low, high) in FLAG_RANGES.items():
    yield flag, low - 1 if flag != 'val_fraction' else -0.1
    yield flag, high + 1 if high is not None else (1.0 if flag == 'val_fraction' else None)


@pytest.mark.parametrize('flag, value', [(f, v) for f, v in _out_of_range() if v is not None])
def test_prepare_refuses_options_out_of_range(tmp_path, flag, value):
  source = tmp_path / 'source'
  (source / 'a').mkdir(parents=True)
  _image(source / 'a' / 'x.png')
  with pytest.raises(errors.PrepareError, match=f'--{flag}={value}: must be'):
    prepare.prepare(str(source), 'n', data_dir=str(tmp_path / 'out'), progress=False,
                    **{**DEFAULTS, flag: value})
  assert not (tmp_path / 'out').exists()


def test_prepare_accepts_the_bounds(tmp_path):
  source = tmp_path / 'source'
  for name in ('a', 'b'):
    (source / name).mkdir(parents=True)
    _image(source / name / 'x.png', size=(12, 10))
  lows = {f: low for f, (low, _) in FLAG_RANGES.items() if f != 'max_pixels'}  # 1 pixel: none
  directory = prepare.prepare(str(source), 'low', data_dir=str(tmp_path / 'out'), progress=False,
                              **{**DEFAULTS, **lows})
  meta = json.load(open(os.path.join(directory, 'metadata.json')))
  assert meta['image_size'] == 1 and len(meta['splits']['train']['shards']) == 2
  prepare.check_arguments(**{**DEFAULTS, 'jpeg_quality': 100, 'image_size': 65_500})


# The cases, through the command (each run is a Python start-up of a few seconds).
BAD_FLAGS = ['--examples_per_shard=0', '--jpeg_quality=500', '--image_size=0']


def test_prepare_command_refuses_flags_out_of_range_in_one_line(tmp_path):
  source = tmp_path / 'source'
  for name in ('a', 'b'):
    (source / name).mkdir(parents=True)
    _image(source / name / 'x.png')
  before = sorted(os.walk(source))
  runs = []
  for i, flag in enumerate(BAD_FLAGS):  # all at once
    out = tmp_path / f'out{i}'
    runs.append((out,
                 subprocess.Popen([
                     sys.executable, '-m', 'alexnet_jax.tools.prepare', f'--source={source}',
                     '--name=n', f'--data_dir={out}', flag
                 ], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  for flag, (out, proc) in zip(BAD_FLAGS, runs):
    stdout, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert proc.returncode == 2, (flag, stderr)
    assert 'Traceback' not in stderr, (flag, stderr)
    assert len(lines) == 1 and lines[0].startswith(f'error: {flag}: must be'), (flag, stderr)
    assert not out.exists() and stdout == '', flag
  assert sorted(os.walk(source)) == before


# ---------------------------------------------------------------------------
# Damaged shards are named
# ---------------------------------------------------------------------------

TINY = dict(num_train=64, num_val=24, image_size=40, seed=0)


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
  """A built-in set and a prepared one (their directories), to copy and damage."""
  root = tmp_path_factory.mktemp('sets')
  built = builtin.ensure_builtin(str(root / 'data'), progress=False, **TINY)
  photos = root / 'photos'
  rng = np.random.default_rng(0)
  for name in ('a', 'b'):
    (photos / name).mkdir(parents=True)
    for i in range(6):
      Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(photos / name / f'{i}.png')
  prepared = prepare.prepare(str(photos), 'photos', data_dir=str(root / 'data'), val_fraction=0.2,
                             image_size=16, examples_per_shard=4, workers=0, progress=False)
  return dict(builtin=built, prepared=prepared)


def _copy(directory, tmp_path):
  """A copy at the same depth below a folder of the same name (the remedy depends on it)."""
  copy = tmp_path / os.path.basename(os.path.dirname(directory)) / os.path.basename(directory)
  shutil.copytree(directory, copy)
  return str(copy)


def _first_train_shard(directory):
  meta = json.load(open(os.path.join(directory, 'metadata.json')))
  return os.path.join(directory, meta['splits']['train']['shards'][0])


def _damage(path, how):
  data = open(path, 'rb').read()
  if how == 'truncated':
    data = data[:len(data) // 3]
  else:
    data = np.random.default_rng(1).integers(0, 256, len(data), np.uint8).tobytes()
  with open(path, 'wb') as f:
    f.write(data)


@pytest.mark.parametrize('kind, remedy', [('builtin', 'generated anew'),
                                          ('prepared', 'alexnet_jax.tools.prepare')])
@pytest.mark.parametrize('how', ['truncated', 'randomised'])
def test_damaged_shard_is_named(sets, tmp_path, kind, remedy, how):
  directory = _copy(sets[kind], tmp_path)
  shard = _first_train_shard(directory)
  _damage(shard, how)
  with pytest.raises(errors.UserError) as info:
    catalog.open_record_directory(directory, 'train')
  assert isinstance(info.value, sources.DamagedShardError)
  message = str(info.value)
  assert shard in message and 'damaged' in message and remedy in message
  assert f'delete {directory}' in message and '\n' not in message
  # The other split is intact and still opens.
  assert len(catalog.open_record_directory(directory, 'validation')) > 0


def test_missing_shard_or_wrong_count_is_named(sets, tmp_path):
  directory = _copy(sets['prepared'], tmp_path)
  shard = _first_train_shard(directory)
  reader = ArrayRecordReader(shard)
  kept = list(reader.read_all())[:-1]
  reader.close()
  writer = ArrayRecordWriter(shard, 'group_size:1')  # a sound shard with a record less
  for r in kept:
    writer.write(r)
  writer.close()
  with pytest.raises(sources.DamagedShardError, match='metadata.json says'):
    catalog.open_record_directory(directory, 'train')
  os.remove(shard)
  with pytest.raises(sources.DamagedShardError, match=f'shard {shard} is missing'):
    catalog.open_record_directory(directory, 'train')
  with open(os.path.join(directory, 'metadata.json'), 'wb') as f:
    f.write(np.random.default_rng(2).integers(0, 256, 300, np.uint8).tobytes())
  with pytest.raises(errors.DatasetNotFoundError, match='metadata.json is damaged'):
    catalog.open_source(configs.dataset_config(name='photos', data_dir=os.path.dirname(directory)),
                        'train')


def test_training_on_a_damaged_builtin_set_fails_in_one_line(tmp_path):
  data_dir = tmp_path / 'data'
  # The set the command's first run would generate (main calls the same function).
  directory = builtin.ensure_builtin(str(data_dir), num_train=64, num_val=24, image_size=72, seed=0,
                                     progress=False)
  shard = _first_train_shard(directory)
  _damage(shard, 'truncated')
  run = subprocess.run([
      sys.executable, '-m', 'alexnet_jax.main', '--config=configs/demo.py',
      f'--workdir={tmp_path / "work"}', f'--config.dataset.data_dir={data_dir}',
      '--config.dataset.num_train=64', '--config.dataset.num_val=24',
      '--config.dataset.image_size=72', '--config.model.image_size=67',
      '--config.model.width=0.0625', '--config.batch_size=16', '--config.eval_batch_size=16',
      '--config.num_epochs=1', '--config.input.workers=0'
  ], cwd=REPO, env=dict(ENV, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
                       capture_output=True, text=True, timeout=300)
  lines = [line for line in run.stderr.splitlines() if line.startswith('error: ')]
  assert run.returncode == 2, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr
  assert len(lines) == 1 and shard in lines[0] and f'delete {directory}' in lines[0]
