"""Static facts about each dataset and on-device normalisation.

Everything here is a constant, so training code can size schedules and models
without touching the data on disk.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from fttw_jax.data import digits


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the code needs to know about a dataset.

  `mean`/`std` are per channel on the 0..1 scale (pixel / 255). `image_size` is
  the height (= width) of the model input after preprocessing.
  """
  name: str
  num_classes: int
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  train_split: str
  eval_split: str
  num_train: int
  num_eval: int


# CIFAR constants of the reference's scripts (SPEC section 6), used for
# CIFAR-100 too, as the reference does.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Computed over the 1,437 upsampled digits train images (grey, so equal
# across channels).
_DIGITS_MEAN = (0.3054, 0.3054, 0.3054)
_DIGITS_STD = (0.3237, 0.3237, 0.3237)

_INFOS = {
    info.name: info for info in (
        DatasetInfo('digits', digits.NUM_CLASSES, digits.IMAGE_SIZE,
                    _DIGITS_MEAN, _DIGITS_STD, 'train', 'test',
                    digits.NUM_TRAIN, digits.NUM_TEST),
        DatasetInfo('cifar10', 10, 32, _CIFAR_MEAN, _CIFAR_STD,
                    'train', 'test', 50_000, 10_000),
        DatasetInfo('cifar100', 100, 32, _CIFAR_MEAN, _CIFAR_STD,
                    'train', 'test', 50_000, 10_000),
        DatasetInfo('imagenet2012', 1000, 224, _IMAGENET_MEAN, _IMAGENET_STD,
                    'train', 'validation', 1_281_167, 50_000),
    )
}

DATASET_NAMES = tuple(_INFOS)


def get_info(name: str) -> DatasetInfo:
  """Returns the constants of dataset `name`; ValueError if it is unknown."""
  try:
    return _INFOS[name]
  except KeyError:
    raise ValueError(
        f'Unknown dataset {name!r}; valid names: {", ".join(DATASET_NAMES)}.'
    ) from None


def normalize(images, name: str):
  """Maps uint8 (or 0..255 float) NHWC images to float32 (x - mean) / std.

  Pipelines yield uint8 (4x less host-to-device traffic); this runs on device,
  inside or outside `jax.jit`.
  """
  info = get_info(name)
  mean = np.asarray(info.mean, np.float32) * 255.0
  std = np.asarray(info.std, np.float32) * 255.0
  return (jnp.asarray(images, jnp.float32) - mean) / std


def steps_per_epoch(name: str, global_batch_size: int) -> int:
  """Full batches per epoch; the train iterator drops each epoch's remainder."""
  return get_info(name).num_train // global_batch_size
