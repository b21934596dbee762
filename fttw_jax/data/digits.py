"""`digits`: scikit-learn's bundled 8x8 digits as a TFDS dataset.

The default, offline dataset: it ships with scikit-learn, so it builds with no
network and runs through the same pipeline as CIFAR/ImageNet. Images are scaled
from 0..16 to 0..255, bilinearly upsampled to 32x32 and replicated to 3
channels, so CIFAR-shaped models run on it unchanged.

Split: stratified 80/20 with a fixed seed -> 1,437 train / 360 test images.
"""

from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
NUM_TRAIN = 1437
NUM_TEST = 360


def load_arrays():
  """Returns sklearn's digits as (images uint8 (N, 32, 32, 3), labels int64)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  return upsample(digits.images), digits.target.astype(np.int64)


def upsample(images):
  """Maps (N, 8, 8) floats in 0..16 to (N, 32, 32, 3) uint8 in 0..255."""
  x = np.asarray(images, np.float32)[..., None] * (255.0 / 16.0)
  x = tf.image.resize(x, (IMAGE_SIZE, IMAGE_SIZE), method='bilinear').numpy()
  x = np.clip(np.round(x), 0, 255).astype(np.uint8)
  return np.repeat(x, 3, axis=-1)


def split_indices(labels):
  """Fixed stratified split, so train/test never change between builds."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels,
      random_state=SPLIT_SEED)
  return np.sort(train), np.sort(test)


class Digits(tfds.core.GeneratorBasedBuilder):
  """sklearn 8x8 digits upsampled to 32x32x3 (registered as `digits`)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's default lookup needs `importlib_resources` when the top-level
    # package is a namespace package; this file is the answer it looks for.
    return epath.Path(__file__)

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    images, labels = load_arrays()
    train, test = split_indices(labels)
    return {
        'train': self._generate_examples(images, labels, train),
        'test': self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': labels[i]}
