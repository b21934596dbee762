"""Entry point: ``python main.py --config=configs/<file>.py[:variant] --workdir=DIR``.

Modes: ``train`` (resumes automatically), ``evaluate`` (restore a checkpoint,
write ``eval/<step>.json``), ``estimate`` (FLOPs a given r will cost, before
dynamic training; or the r for ``--target_reduction``), ``calibrate`` (shift a
trained FTWT model's head decision threshold to ``--target_reduction``, written to
the new workdir ``--out``), ``report`` (PNG plots and ``report.md``).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, logs, eval.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'estimate', 'calibrate', 'report'],
                  'What to do.')
flags.DEFINE_string('checkpoint', 'best', "evaluate, calibrate: 'best', 'latest' or a step.")
flags.DEFINE_float('target_reduction', None, 'estimate: find the r giving this FLOPs reduction; '
                   'calibrate: the reduction to calibrate the heads to.')
flags.DEFINE_string('out', None, 'calibrate: the new workdir the calibrated checkpoint goes to.')
flags.DEFINE_float('estimate_examples', 512, 'estimate: training examples to sample.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host; '
                  'auto-detected on TPU VMs and SLURM, else give the three flags below).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: total number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed():
  import jax
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())


def quiet_library_logs():
  """Keep our INFO progress lines; drop orbax's per-file checkpoint chatter."""
  logging.get_absl_handler().addFilter(lambda record: '/orbax/' not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  quiet_library_logs()
  initialize_distributed()
  config = FLAGS.config
  if FLAGS.mode == 'train':
    from fttw_jax import train
    train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == 'evaluate':
    from fttw_jax import evaluate
    evaluate.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint)
  elif FLAGS.mode == 'estimate':
    from fttw_jax import estimate
    estimate.run(config, FLAGS.workdir, target_reduction=FLAGS.target_reduction,
                 num_examples=int(FLAGS.estimate_examples))
  elif FLAGS.mode == 'calibrate':
    from fttw_jax import budget
    which = int(FLAGS.checkpoint) if FLAGS.checkpoint.isdigit() else FLAGS.checkpoint
    budget.run_calibrate(config, FLAGS.workdir, FLAGS.out, FLAGS.target_reduction, which)
  else:
    from fttw_jax import report
    report.write_report(FLAGS.workdir, config)


if __name__ == '__main__':
  app.run(main)
