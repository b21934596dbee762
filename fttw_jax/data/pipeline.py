"""Deterministic, resumable tf.data input pipelines yielding numpy batches.

Train stream: epoch e is the process's split shuffled with stateless ops keyed
by (seed, e); each example is augmented with a key derived from (seed, process,
e, position in the epoch); every epoch yields exactly
`num_train // global_batch_size` full batches. The stream is therefore a pure
function of `seed` (not of tf.data threading or TF's global seed), which makes
`start_step` resumption a matter of arithmetic plus a `skip` inside one epoch
(skipping happens before augmentation and, for ImageNet, JPEG decoding).

Batches hold uint8 images; `normalize` runs on device.
"""

import functools
import math
from typing import Iterator

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fttw_jax.data import augment
# Registers the `digits` TFDS dataset.
from fttw_jax.data import digits  # pylint: disable=unused-import
from fttw_jax.data.info import get_info

Batch = dict[str, np.ndarray]

# Splits up to this size are cached decoded in memory and shuffled as a whole;
# larger ones (ImageNet, still JPEG bytes here) are shuffled within consecutive
# blocks of this many examples (TFDS already shuffled them on disk).
_IN_MEMORY_MAX = 60_000
_SHUFFLE_BLOCK = 10_000  # ~1 GB of ImageNet JPEGs.
_SHUFFLE_STREAM = 0  # Keeps shuffle seeds apart from augmentation keys.


def _hide_accelerators_from_tf():
  """TF only feeds data; the accelerators belong to JAX."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices; nothing to do.
    pass


_hide_accelerators_from_tf()


def _plain(fn):
  """A tf.data function traced as written: no autograph conversion, which writes
  an `__autograph_generated_file*.py` into the temp dir for every function."""
  return tf.autograph.experimental.do_not_convert(fn)


# --------------------------------------------------------------- validation --

def _processes(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count}).')
  return process_index, process_count


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Per-process batch size; the global batch must split evenly."""
  device_count = jax.device_count()
  if (global_batch_size <= 0 or global_batch_size % device_count
      or global_batch_size % process_count):
    raise ValueError(
        f'global_batch_size={global_batch_size} must be a positive multiple of '
        f'jax.device_count()={device_count} and of '
        f'process_count={process_count}.')
  return global_batch_size // process_count


def _prepare_help(name, root):
  if name == 'imagenet2012':
    return (
        f'imagenet2012 needs a manual download: get ILSVRC2012_img_train.tar '
        f'and ILSVRC2012_img_val.tar from https://image-net.org/download-images'
        f', put them in {root}/downloads/manual/ and run '
        f'`tfds build imagenet2012 --data_dir={root}`.')
  return f'Prepare it once, with network access: `tfds build {name} ' \
         f'--data_dir={root}`.'


def prepared_builder(name: str, data_dir=None) -> tfds.core.DatasetBuilder:
  """The dataset's builder, ready to read; never downloads anything.

  `digits` is built from scikit-learn's bundled copy on first use; any other
  dataset must already be prepared in `data_dir` (None: TFDS's default,
  `$TFDS_DATA_DIR` or ~/tensorflow_datasets).
  """
  get_info(name)  # Unknown names fail here, with the list of valid ones.
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if name == 'digits':
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
  raise FileNotFoundError(
      f'Dataset {name!r} is not prepared in {builder.data_dir_root} (this code '
      f'never downloads). {_prepare_help(name, builder.data_dir_root)}')


# ------------------------------------------------------------ preprocessing --

def _train_fn(name):
  return {'digits': augment.digits_train,
          'cifar10': augment.cifar_train,
          'cifar100': augment.cifar_train,
          'imagenet2012': augment.imagenet_train}[name]


def _eval_fn(name):
  return augment.imagenet_eval if name == 'imagenet2012' else augment.identity


def _decoders(name):
  """ImageNet stays JPEG bytes so the train crop decodes only its window."""
  if name == 'imagenet2012':
    return {'image': tfds.decode.SkipDecoding()}
  return None


def _options():
  options = tf.data.Options()
  options.deterministic = True
  return options


def _read(builder, split, name) -> tf.data.Dataset:
  """(image, label) examples of `split` in a fixed order."""
  read_config = tfds.ReadConfig(options=_options(), try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders=_decoders(name), read_config=read_config)
  return ds.map(_plain(lambda ex: {'image': ex['image'],
                                   'label': tf.cast(ex['label'], tf.int32)}))


# -------------------------------------------------------------------- train --

def _permute(block, key):
  """Stateless random permutation of one block of examples."""
  order = tf.random.experimental.stateless_shuffle(
      tf.range(tf.shape(block['label'])[0]), seed=key, alg='philox')
  return tf.data.Dataset.from_tensor_slices(
      tf.nest.map_structure(lambda x: tf.gather(x, order), block))


def _epoch(epoch, *, blocks, seed, num_batches, batch_size, start_epoch,
           skip_batches):
  """One epoch: shuffled, numbered, cut to whole batches, resumed if first.

  Shuffling permutes each block with a key of (seed, epoch, block), using
  stateless ops so that not even TF's global seed changes the order.
  """
  key = tf.random.fold_in(tf.constant([seed, _SHUFFLE_STREAM], tf.int64),
                          epoch, alg='philox')
  ds = blocks.enumerate().flat_map(_plain(
      lambda b, block: _permute(block, tf.random.fold_in(key, b, alg='philox'))))
  ds = ds.enumerate().take(num_batches * batch_size)
  skip = tf.where(epoch == start_epoch, skip_batches * batch_size, 0)
  ds = ds.skip(tf.cast(skip, tf.int64))
  return ds.map(_plain(lambda index, ex: (epoch, index, ex)))


def _train_example(epoch, index, ex, *, name, seed, process_index):
  key = augment.example_key(seed, process_index, epoch, index)
  return {'image': _train_fn(name)(ex['image'], key), 'label': ex['label']}


def create_train_iterator(name: str, global_batch_size: int, *, seed: int,
                          start_step: int = 0, data_dir=None,
                          process_index=None,
                          process_count=None) -> Iterator[Batch]:
  """Infinite iterator of {'image': uint8 (B,H,W,3), 'label': int32 (B,)}.

  B = global_batch_size // process_count. Starting at `start_step=k` yields
  exactly what a fresh iterator yields from its k-th batch on.
  """
  info = get_info(name)
  process_index, process_count = _processes(process_index, process_count)
  batch_size = local_batch_size(global_batch_size, process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  builder = prepared_builder(name, data_dir)
  num_examples = builder.info.splits[info.train_split].num_examples
  num_batches = num_examples // global_batch_size
  if num_batches == 0:
    raise ValueError(f'global_batch_size={global_batch_size} exceeds the '
                     f'{num_examples} examples of {name}:{info.train_split}.')
  # drop_remainder: equal shares, each holding >= num_batches local batches.
  split = tfds.split_for_jax_process(
      info.train_split, process_index=process_index,
      process_count=process_count, drop_remainder=True)
  local_examples = num_examples // process_count
  if local_examples <= _IN_MEMORY_MAX:  # One block, cached: a full shuffle.
    blocks = _read(builder, split, name).batch(local_examples).cache()
  else:  # Read the next block while the current one is consumed.
    blocks = _read(builder, split, name).batch(_SHUFFLE_BLOCK).prefetch(1)

  start_epoch, skip_batches = divmod(start_step, num_batches)
  epoch_fn = functools.partial(
      _epoch, blocks=blocks, seed=seed, num_batches=num_batches,
      batch_size=batch_size, start_epoch=start_epoch,
      skip_batches=skip_batches)
  example_fn = functools.partial(_train_example, name=name, seed=seed,
                                 process_index=process_index)
  ds = tf.data.Dataset.counter(start_epoch).flat_map(_plain(epoch_fn))
  ds = ds.map(_plain(example_fn), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds.with_options(_options())))


# --------------------------------------------------------------------- eval --

def _eval_split(split, max_examples):
  if max_examples is None:
    return split
  if any(c in split for c in '[+'):
    raise ValueError(f'max_examples needs a plain split name, got {split!r}.')
  return f'{split}[:{max_examples}]'


def create_eval_iterator(name: str, global_batch_size: int, *, data_dir=None,
                         split=None, process_index=None, process_count=None,
                         max_examples=None) -> Iterator[Batch]:
  """One pass over `split` (default: the eval split) in full, masked batches.

  Batches carry 'mask' (float32, 1 real / 0 padding). Every process yields the
  same number of batches, and each example of the split (or of its first
  `max_examples`) has mask 1 exactly once across processes.
  """
  info = get_info(name)
  process_index, process_count = _processes(process_index, process_count)
  batch_size = local_batch_size(global_batch_size, process_count)
  builder = prepared_builder(name, data_dir)
  split = _eval_split(split or info.eval_split, max_examples)
  num_examples = builder.info.splits[split].num_examples
  num_batches = math.ceil(math.ceil(num_examples / process_count) / batch_size)
  local = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)

  eval_fn = _eval_fn(name)
  ds = _read(builder, local, name).map(
      _plain(lambda ex: {'image': eval_fn(ex['image']), 'label': ex['label'],
                         'mask': tf.constant(1.0, tf.float32)}),
      num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors(
      {'image': tf.zeros((info.image_size, info.image_size, 3), tf.uint8),
       'label': tf.constant(0, tf.int32),
       'mask': tf.constant(0.0, tf.float32)}).repeat()
  ds = ds.concatenate(padding).take(num_batches * batch_size)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds.with_options(_options())))


# ------------------------------------------------------------------ devices --

def shard_batch(batch: Batch, mesh: jax.sharding.Mesh):
  """Process-local numpy batch -> global jax Arrays split along mesh 'data'."""
  sharding = NamedSharding(mesh, P('data'))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
