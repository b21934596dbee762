"""Per-example preprocessing as pure, stateless TF functions.

Every random choice takes an explicit `key` (a shape-[2] int64 seed for TF's
stateless ops), so an example's augmentation depends only on its key and not
on tf.data threading, the global TF seed or how often the pipeline restarted.
All functions return uint8 HWC images.
"""

import tensorflow as tf

CIFAR_PAD = 4
IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256
_AUGMENT_STREAM = 1  # Keeps augmentation keys apart from shuffle seeds.


def example_key(seed, process_index, epoch, index):
  """Key of one training example: a function of its identity only."""
  key = tf.constant([seed, _AUGMENT_STREAM], tf.int64)
  for data in (process_index, epoch, index):
    key = tf.random.fold_in(key, tf.cast(data, tf.int64), alg='philox')
  return key


def _to_uint8(image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def pad_and_crop(image, key, pad=CIFAR_PAD):
  """Random crop of the original size from the zero-padded image."""
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, tf.shape(image), seed=key)


def cifar_train(image, key):
  """CIFAR: 4-pixel padded random crop + horizontal flip."""
  crop_key, flip_key = tf.unstack(tf.random.split(key, 2, alg='philox'))
  image = pad_and_crop(image, crop_key)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def digits_train(image, key):
  """Digits: padded random crop only; digits are not mirror-symmetric."""
  return pad_and_crop(image, key)


def identity(image):
  """CIFAR/digits eval: images are already model-sized."""
  return image


def crop_window(shape, key, area=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
  """Random-resized-crop window [y, x, h, w] for an image of `shape` (HWC).

  Area fraction in `area`, aspect ratio w/h in `ratio`, as torchvision's
  RandomResizedCrop. If 10 tries fail TF returns the whole image.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=key,
      min_object_covered=0.0,
      aspect_ratio_range=ratio,
      area_range=area,
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def imagenet_train(image_bytes, key, size=IMAGENET_SIZE):
  """Random-resized-crop + flip from JPEG bytes, decoding only the crop."""
  crop_key, flip_key = tf.unstack(tf.random.split(key, 2, alg='philox'))
  window = crop_window(tf.image.extract_jpeg_shape(image_bytes), crop_key)
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  image = tf.image.resize(image, (size, size), 'bilinear', antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
  return _to_uint8(image)


def imagenet_eval(image_bytes, size=IMAGENET_SIZE, resize=IMAGENET_RESIZE):
  """Resize the shorter side to 256, then take the central 224x224."""
  image = tf.io.decode_jpeg(image_bytes, channels=3)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  new_hw = tf.cast(hw * (resize / tf.reduce_min(hw)), tf.int32)
  new_hw = tf.maximum(new_hw, resize)  # Guard against float round-down.
  image = tf.image.resize(image, new_hw, 'bilinear', antialias=True)
  top, left = tf.unstack((new_hw - size) // 2)
  image = tf.image.crop_to_bounding_box(image, top, left, size, size)
  return _to_uint8(image)
