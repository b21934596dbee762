"""Tests of fttw_jax.data: digits builder, pipelines, resumption, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fttw_jax import data
from fttw_jax.data import digits
from fttw_jax.data import pipeline
from fttw_jax.data import testing as data_testing

NUM_DEVICES = 4  # tests/conftest.py forces 4 CPU devices.


# ------------------------------------------------------------------ helpers --

@pytest.fixture(params=['in_memory', 'streamed'])
def shuffle_mode(request, monkeypatch):
  """Runs a test on both shuffle paths: whole split, or 300-example blocks."""
  if request.param == 'streamed':
    monkeypatch.setattr(pipeline, '_IN_MEMORY_MAX', 100)
    monkeypatch.setattr(pipeline, '_SHUFFLE_BLOCK', 300)
  return request.param


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  pipeline.prepared_builder('digits', data_dir)
  return data_dir


def _split_arrays(name, split, data_dir):
  """A whole split as numpy arrays, in storage order."""
  builder = pipeline.prepared_builder(name, data_dir)
  return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _crop_index(raw_images, pad=4, flips=(False,)):
  """Maps the bytes of every padded crop (and flip) to its raw index/offset."""
  padded = np.pad(raw_images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
  h, w = raw_images.shape[1:3]
  index = {}
  for flip in flips:
    for dy in range(2 * pad + 1):
      for dx in range(2 * pad + 1):
        crops = padded[:, dy:dy + h, dx:dx + w]
        if flip:
          crops = crops[:, :, ::-1]
        for i, crop in enumerate(crops):
          index.setdefault(crop.tobytes(), []).append((i, dy, dx, flip))
  return index


def _forbid_downloads(monkeypatch):
  """Makes any download attempt fail loudly and records it."""
  calls = []

  def fail(*args, **kwargs):
    calls.append(args)
    raise AssertionError('download attempted')

  for method in ('download', 'download_and_extract', 'extract'):
    monkeypatch.setattr(tfds.download.DownloadManager, method, fail)
  return calls


# ------------------------------------------------------------ digits builder --

def test_digits_builder_splits(digits_dir):
  builder = tfds.builder('digits', data_dir=digits_dir)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == digits.NUM_TRAIN == 1437
  assert builder.info.splits['test'].num_examples == digits.NUM_TEST == 360
  train = _split_arrays('digits', 'train', digits_dir)
  test = _split_arrays('digits', 'test', digits_dir)
  for split in (train, test):
    assert split['image'].shape[1:] == (32, 32, 3)
    assert split['image'].dtype == np.uint8
    assert set(np.unique(split['label'])) == set(range(10))
    assert split['image'].max() == 255
    np.testing.assert_array_equal(split['image'][..., 0],
                                  split['image'][..., 2])

  # Train and test partition the 1,797 sklearn images (as a multiset).
  images, labels = digits.load_arrays()
  assert len(images) == 1797

  def keys(imgs, lbls):
    return sorted(im.tobytes() + bytes([l]) for im, l in zip(imgs, lbls))

  assert keys(np.concatenate([train['image'], test['image']]),
              np.concatenate([train['label'], test['label']])) == keys(
                  images, labels)


def test_digits_build_is_deterministic_and_offline(digits_dir, tmp_path,
                                                   monkeypatch):
  calls = _forbid_downloads(monkeypatch)
  pipeline.prepared_builder('digits', tmp_path)
  assert not calls
  for split in ('train', 'test'):
    a = _split_arrays('digits', split, digits_dir)
    b = _split_arrays('digits', split, tmp_path)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_digits_normalisation_constants(digits_dir):
  images = _split_arrays('digits', 'train', digits_dir)['image'] / 255.0
  info = data.get_info('digits')
  np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), info.mean, atol=1e-3)
  np.testing.assert_allclose(images.std(axis=(0, 1, 2)), info.std, atol=1e-3)


# --------------------------------------------------------------------- info --

def test_get_info_and_steps():
  assert data.get_info('cifar10').num_classes == 10
  assert data.get_info('cifar100').num_classes == 100
  imagenet = data.get_info('imagenet2012')
  assert (imagenet.image_size, imagenet.eval_split) == (224, 'validation')
  assert (imagenet.num_train, imagenet.num_eval) == (1_281_167, 50_000)
  assert data.get_info('digits').num_train == 1437
  assert data.steps_per_epoch('cifar10', 128) == 390
  assert data.steps_per_epoch('digits', 64) == 22
  with pytest.raises(ValueError, match=r"'mnist'.*cifar10"):
    data.get_info('mnist')


@pytest.mark.parametrize('name', data.DATASET_NAMES)
def test_normalize_matches_numpy(name):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 5, 5, 3), dtype=np.uint8)
  info = data.get_info(name)
  expected = (images / 255.0 - np.array(info.mean)) / np.array(info.std)
  for x in (images, jnp.asarray(images), images.astype(np.float32)):
    out = jax.jit(data.normalize, static_argnums=1)(x, name)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(data.normalize(images, name), expected,
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- digits pipeline --

def test_train_resumes_exactly_across_epochs(digits_dir, shuffle_mode):
  # 1437 // 256 = 5 steps per epoch: steps 0..11 span three epochs.
  fresh = _take(data.create_train_iterator(
      'digits', 256, seed=3, data_dir=digits_dir), 12)
  for start in (3, 5, 7, 10):
    resumed = _take(data.create_train_iterator(
        'digits', 256, seed=3, start_step=start, data_dir=digits_dir),
                    12 - start)
    for a, b in zip(fresh[start:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  # A new epoch reshuffles, and another seed gives another stream.
  assert not np.array_equal(fresh[0]['label'], fresh[5]['label'])
  other = next(data.create_train_iterator(
      'digits', 256, seed=4, data_dir=digits_dir))
  assert not np.array_equal(fresh[0]['label'], other['label'])


def test_train_stream_ignores_tf_global_seed(digits_dir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  fresh = next(data.create_train_iterator('digits', 256, seed=0,
                                          data_dir=digits_dir))
  tf.random.set_seed(123)
  try:
    seeded = next(data.create_train_iterator('digits', 256, seed=0,
                                             data_dir=digits_dir))
  finally:
    tf.random.set_seed(None)
  np.testing.assert_array_equal(fresh['label'], seeded['label'])
  np.testing.assert_array_equal(fresh['image'], seeded['image'])


def test_train_digits_epochs_are_crops_of_disjoint_shares(digits_dir,
                                                          shuffle_mode):
  raw = _split_arrays('digits', 'train', digits_dir)
  index = _crop_index(raw['image'][..., :1])
  seen = []
  for process in range(2):  # 1437 // 128 = 11 steps of 64 local examples.
    batches = _take(data.create_train_iterator(
        'digits', 128, seed=0, data_dir=digits_dir,
        process_index=process, process_count=2), 11)
    assert batches[0]['image'].shape == (64, 32, 32, 3)
    assert batches[0]['image'].dtype == np.uint8
    assert batches[0]['label'].dtype == np.int32
    sources, offsets = [], set()
    for b in batches:
      for image, label in zip(b['image'], b['label']):
        matches = index.get(image[..., :1].tobytes())
        assert matches, 'not a padded crop of a train image (flipped?)'
        i, dy, dx, _ = matches[0]
        assert raw['label'][i] == label
        sources.append(frozenset(m[0] for m in matches))
        offsets.add((dy, dx))
    assert len(offsets) > 10  # Crops really move.
    unique = [s for s in sources if len(s) == 1]
    assert len(unique) > 0.9 * len(sources)
    assert len(set(unique)) == len(unique)  # No example twice in an epoch.
    seen.append(set().union(*unique))
  assert not seen[0] & seen[1]  # Processes read disjoint shares.


def test_eval_counts_every_example_once(digits_dir):
  raw = _split_arrays('digits', 'test', digits_dir)
  real, lengths = [], []
  for process in range(3):  # 360 examples, 3 processes, local batch 8.
    batches = list(data.create_eval_iterator(
        'digits', 24, data_dir=digits_dir, process_index=process,
        process_count=3))
    lengths.append(len(batches))
    for b in batches:
      assert b['image'].shape == (8, 32, 32, 3)
      assert b['mask'].dtype == np.float32
      for image, mask in zip(b['image'], b['mask']):
        if mask:
          real.append(image.tobytes())
        else:
          assert not image.any()
  assert len(set(lengths)) == 1
  assert sorted(real) == sorted(im.tobytes() for im in raw['image'])

  batches = list(data.create_eval_iterator(
      'digits', 32, data_dir=digits_dir, max_examples=50))
  assert sum(b['mask'].sum() for b in batches) == 50
  assert len(batches) == 2


def test_shard_batch(digits_dir):
  batch = next(data.create_eval_iterator('digits', 8, data_dir=digits_dir))
  mesh = jax.make_mesh((NUM_DEVICES,), ('data',))
  sharded = data.shard_batch(batch, mesh)
  assert set(sharded) == {'image', 'label', 'mask'}
  for key, value in sharded.items():
    assert value.sharding.spec == jax.sharding.PartitionSpec('data')
    assert len(value.addressable_shards) == NUM_DEVICES
    assert value.addressable_shards[0].data.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(value), batch[key])


# ------------------------------------------------------------ mocked CIFAR --

def test_cifar10_mocked(tmp_path):
  n = 40
  with data_testing.mock_dataset('cifar10', tmp_path, n):
    raw = _split_arrays('cifar10', 'train', tmp_path)
    index = _crop_index(raw['image'], flips=(False, True))
    batches = _take(data.create_train_iterator(
        'cifar10', 16, seed=0, data_dir=tmp_path), 6)  # 2 steps per epoch.
    flips, offsets = set(), set()
    for b in batches:
      assert b['image'].shape == (16, 32, 32, 3)
      assert b['image'].dtype == np.uint8
      assert b['label'].dtype == np.int32
      for image, label in zip(b['image'], b['label']):
        matches = index.get(image.tobytes())
        assert matches, 'not a padded crop (or its mirror) of a train image'
        i, dy, dx, flip = matches[0]
        assert raw['label'][i] == label
        flips.add(flip)
        offsets.add((dy, dx))
    assert flips == {False, True}
    assert len(offsets) > 5

    batches = list(data.create_eval_iterator('cifar10', 16, data_dir=tmp_path))
    assert [b['image'].shape for b in batches] == [(16, 32, 32, 3)] * 3
    assert sum(b['mask'].sum() for b in batches) == n
    real = np.concatenate([b['image'][b['mask'] > 0] for b in batches])
    np.testing.assert_array_equal(real, raw['image'])  # Eval is untouched.


def test_imagenet_mocked(tmp_path):
  n = 6
  with data_testing.mock_dataset('imagenet2012', tmp_path, n):
    train = [next(data.create_train_iterator(
        'imagenet2012', 4, seed=s, data_dir=tmp_path)) for s in (0, 0, 1)]
    for b in train:
      assert b['image'].shape == (4, 224, 224, 3)
      assert b['image'].dtype == np.uint8
      assert b['label'].dtype == np.int32
    np.testing.assert_array_equal(train[0]['image'], train[1]['image'])
    assert not np.array_equal(train[0]['image'], train[2]['image'])

    batches = list(data.create_eval_iterator(
        'imagenet2012', 4, data_dir=tmp_path))
    assert [b['image'].shape for b in batches] == [(4, 224, 224, 3)] * 2
    assert sum(b['mask'].sum() for b in batches) == n
    eval_labels = np.concatenate([b['label'] for b in batches])[:n]
    # Random-resized crops differ from the deterministic eval centre crops.
    first = next(data.create_eval_iterator('imagenet2012', 4,
                                           data_dir=tmp_path))
    assert not np.array_equal(np.sort(train[0]['image'], axis=None),
                              np.sort(first['image'], axis=None))
    assert set(eval_labels) <= set(range(1000))


def test_imagenet_crop_window_scale_and_ratio():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from fttw_jax.data import augment  # pylint: disable=g-import-not-at-top
  shape = tf.constant([300, 400, 3], tf.int32)
  windows = np.array([
      augment.crop_window(shape, tf.constant([7, i], tf.int64)).numpy()
      for i in range(200)])
  y, x, h, w = windows.T
  assert (y >= 0).all() and (x >= 0).all()
  assert (y + h <= 300).all() and (x + w <= 400).all()
  area = h * w / (300 * 400)
  assert area.min() >= 0.07 and area.max() <= 1.0 and area.min() < 0.3
  ratio = w / h
  assert ratio.min() >= 0.7 and ratio.max() <= 1.4
  assert len({tuple(v) for v in windows}) > 150  # Windows vary with the key.
  # Stateless: the same key gives the same window.
  np.testing.assert_array_equal(
      augment.crop_window(shape, tf.constant([7, 3], tf.int64)), windows[3])


def test_imagenet_eval_resize_and_centre_crop():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from fttw_jax.data import augment  # pylint: disable=g-import-not-at-top
  # A 300x600 image whose left half is black and right half white: after
  # resizing to 256x512, the centre 224 columns straddle the edge evenly.
  image = np.zeros((300, 600, 3), np.uint8)
  image[:, 300:] = 255
  out = augment.imagenet_eval(tf.io.encode_jpeg(image, quality=100)).numpy()
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  assert out[:, :100].max() < 20 and out[:, 124:].min() > 235


# ------------------------------------------------------------------- errors --

@pytest.mark.parametrize('batch, process_count', [(6, 1), (8, 3), (0, 1)])
def test_bad_batch_size(digits_dir, batch, process_count):
  match = rf'{batch}.*device_count\(\)={NUM_DEVICES}.*={process_count}'
  with pytest.raises(ValueError, match=match):
    data.create_train_iterator('digits', batch, seed=0, data_dir=digits_dir,
                               process_index=0, process_count=process_count)
  with pytest.raises(ValueError, match=match):
    data.create_eval_iterator('digits', batch, data_dir=digits_dir,
                              process_index=0, process_count=process_count)


def test_unknown_dataset():
  with pytest.raises(ValueError, match=r"'mnist'.*digits.*imagenet2012"):
    data.create_train_iterator('mnist', 8, seed=0)
  with pytest.raises(ValueError, match="'mnist'"):
    data.create_eval_iterator('mnist', 8)


@pytest.mark.parametrize('name, hint', [
    ('cifar10', 'tfds build cifar10 --data_dir='),
    ('imagenet2012', 'downloads/manual'),
])
def test_unprepared_dataset_fails_without_download(tmp_path, monkeypatch,
                                                   name, hint):
  calls = _forbid_downloads(monkeypatch)
  prepares = []
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      lambda *a, **k: prepares.append(a))
  with pytest.raises(FileNotFoundError, match=hint):
    data.create_train_iterator(name, 8, seed=0, data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match=hint):
    data.create_eval_iterator(name, 8, data_dir=tmp_path)
  assert not calls and not prepares
  assert not any(tmp_path.rglob('*.tfrecord*'))


def test_pipelines_write_no_autograph_files(digits_dir, tmp_path):
  # tf.data functions go through autograph by default, which writes a
  # `__autograph_generated_file*.py` into the temp dir per function and deletes
  # them only at a clean exit: a killed or preempted run leaves them behind.
  # The script lists its temp dir while still running. (Run as a file: under
  # `python -c` autograph converts nothing.)
  import os
  import subprocess
  import sys
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  script = tmp_path / 'read_both.py'
  script.write_text(
      'import os, tempfile\n'
      'from fttw_jax import data\n'
      f'next(data.create_train_iterator("digits", 64, seed=0, data_dir={str(digits_dir)!r}))\n'
      f'next(data.create_eval_iterator("digits", 64, data_dir={str(digits_dir)!r}))\n'
      'print(sorted(os.listdir(tempfile.gettempdir())))\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, TMPDIR=str(scratch), PYTHONPATH=root)
  proc = subprocess.run([sys.executable, str(script)], check=True, env=env,
                        capture_output=True, text=True)
  assert proc.stdout.strip().splitlines()[-1] == '[]'
