"""Fake, offline CIFAR/ImageNet for tests, via `tfds.testing.mock_data`.

The pipelines refuse datasets that are not prepared, and a bare `mock_data`
leaves them unprepared and without split sizes. Here we first write the
dataset's real metadata (with the fake split sizes) into a scratch data_dir, so
the pipelines see a prepared dataset whose examples are mocked.
"""

import contextlib

import tensorflow_datasets as tfds

from fttw_jax.data.info import get_info


def write_metadata(name: str, data_dir, num_examples: int) -> None:
  """Writes `name`'s dataset_info.json with train/eval splits of this size."""
  info = get_info(name)
  builder = tfds.builder(name, data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_path, dataset_name=builder.name,
      template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
      filetype_suffix='tfrecord')
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[num_examples],
                          num_bytes=0, filename_template=template)
      for split in (info.train_split, info.eval_split)
  ]))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)


@contextlib.contextmanager
def mock_dataset(name: str, data_dir, num_examples: int):
  """Within the block, `name` reads as `num_examples` fixed random examples.

  Every split (and sub-split) yields the same examples, so use
  `process_count=1` when comparing against split sizes.
  """
  write_metadata(name, data_dir, num_examples)
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir),
                              policy=tfds.testing.MockPolicy.USE_FILES):
    yield
