"""Entry point: ``python main.py --config=configs/<file>.py[:variant] --workdir=DIR``.

Modes: ``train`` (resumes automatically), ``evaluate`` (restore a checkpoint,
write ``eval/<step>.json``), ``estimate`` (FLOPs a given r will cost, before
dynamic training; or the r for ``--target_reduction``), ``static`` (the FTWT
checkpoint vs static pruning at the same cost, ``static.json``), ``calibrate``
(shift a trained FTWT model's head decision threshold to ``--target_reduction``,
written to the new workdir ``--out``), ``report`` (PNG plots and ``report.md``).

Exit status: 0 done; 2 bad input (a config value or variant, a missing file, a
``--checkpoint`` choice, a workdir of another run: one line, no traceback unless
``--debug``); 3 training hit a non-finite loss or state (nothing of it saved);
143 preempted by SIGTERM after checkpointing (rerun the same command to resume);
anything else is a bug and prints its traceback.

Console: our progress lines and every library's warnings; absl's ``--verbosity=1``
adds every library's INFO lines (tfds, orbax, jax, ...).
"""

import logging as std_logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fttw_jax import errors  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, logs, eval.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'estimate', 'static', 'calibrate',
                                    'report'], 'What to do.')
flags.DEFINE_string('checkpoint', 'best',
                    "evaluate, static, calibrate: 'best', 'latest' or a step number.")
flags.DEFINE_bool('overwrite', False, "train: discard the workdir's artefacts of another run "
                  '(checkpoints, eval, events, config.json, run.json, report) and start afresh.')
flags.DEFINE_bool('debug', False, 'Print tracebacks for bad-input errors too.')
flags.DEFINE_float('target_reduction', None, 'estimate: find the r giving this FLOPs reduction; '
                   'calibrate: the reduction to calibrate the heads to.')
flags.DEFINE_string('out', None, 'calibrate: the new workdir the calibrated checkpoint goes to.')
flags.DEFINE_integer('estimate_examples', 512, 'estimate: training examples to sample.',
                     lower_bound=1)
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host; '
                  'auto-detected on TPU VMs and SLURM, else give the three flags below).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: total number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(message: str, code: int) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """absl's parser, but a bad flag or config file is one line and exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    if '--debug' in argv:
      raise
    # config_flags puts the config file's own error (e.g. an unknown variant) last.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(lines[-1] if lines else str(e), errors.EXIT_USER_ERROR)


def initialize_distributed():
  import jax
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())


# Where the console lines of the default verbosity come from: this package (and this
# file), and clu, whose writers print the metrics and the progress (steps/s, ETA).
OWN_SOURCES = (os.path.dirname(os.path.abspath(errors.__file__)) + os.sep,
               os.path.abspath(__file__), f'{os.sep}clu{os.sep}')


def console_filter(record) -> bool:
  """The default console: our progress lines and every library's warnings, except
  orbax's per-file checkpoint chatter; not the INFO lines of tfds, absl, jax, ..."""
  if f'{os.sep}orbax{os.sep}' in record.pathname:
    return False
  return (record.levelno >= std_logging.WARNING
          or any(s in os.path.abspath(record.pathname) for s in OWN_SOURCES))


def quiet_library_logs():
  """At absl's default ``--verbosity=0`` the console gets ``console_filter``'s lines;
  ``--verbosity=1`` (or ``-v 1``) shows every library's INFO (and DEBUG) lines."""
  if FLAGS.verbosity < 1:
    logging.get_absl_handler().addFilter(console_filter)


def run(config) -> int:
  """Run the mode; the exit status."""
  if FLAGS.mode == 'train':
    from fttw_jax import train
    result = train.train_and_evaluate(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
    return errors.EXIT_PREEMPTED if 'preempted_at_step' in (result or {}) else errors.EXIT_OK
  if FLAGS.mode == 'evaluate':
    from fttw_jax import checkpoint, evaluate
    evaluate.evaluate_checkpoint(config, FLAGS.workdir, checkpoint.parse_which(FLAGS.checkpoint))
  elif FLAGS.mode == 'estimate':
    from fttw_jax import estimate
    estimate.run(config, FLAGS.workdir, target_reduction=FLAGS.target_reduction,
                 num_examples=FLAGS.estimate_examples)
  elif FLAGS.mode == 'static':
    from fttw_jax import checkpoint, static
    static.run_checkpoint(config, FLAGS.workdir, checkpoint.parse_which(FLAGS.checkpoint))
  elif FLAGS.mode == 'calibrate':
    from fttw_jax import budget, checkpoint
    budget.run_calibrate(config, FLAGS.workdir, FLAGS.out, FLAGS.target_reduction,
                         checkpoint.parse_which(FLAGS.checkpoint))
  else:
    from fttw_jax import report
    report.write_report(FLAGS.workdir, config)
  return errors.EXIT_OK


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  quiet_library_logs()
  try:
    config = FLAGS.config
    config.get('model')  # config_flags defers a config file's load error to its first use
  except OSError as e:
    if FLAGS.debug:
      raise
    _fail(' '.join(str(e).split()), errors.EXIT_USER_ERROR)
  initialize_distributed()
  try:
    code = run(config)
  except (errors.UserError, FileNotFoundError) as e:  # a missing dataset or file too
    if FLAGS.debug:
      raise
    _fail(' '.join(str(e).split()), errors.EXIT_USER_ERROR)
  except errors.NonFiniteError as e:
    if FLAGS.debug:
      raise
    _fail(str(e), errors.EXIT_NON_FINITE)
  sys.exit(code)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
