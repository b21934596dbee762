"""Input pipelines: TFDS datasets -> deterministic numpy batches -> devices.

Importing this package registers the offline `digits` TFDS dataset.
"""

from fttw_jax.data import digits  # pylint: disable=unused-import
from fttw_jax.data.info import DATASET_NAMES
from fttw_jax.data.info import DatasetInfo
from fttw_jax.data.info import get_info
from fttw_jax.data.info import normalize
from fttw_jax.data.info import steps_per_epoch
from fttw_jax.data.pipeline import create_eval_iterator
from fttw_jax.data.pipeline import create_train_iterator
from fttw_jax.data.pipeline import shard_batch

__all__ = [
    'DATASET_NAMES', 'DatasetInfo', 'create_eval_iterator',
    'create_train_iterator', 'get_info', 'normalize', 'shard_batch',
    'steps_per_epoch',
]
