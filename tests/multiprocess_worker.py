"""One process of the 2-process CPU test (tests/test_multiprocess.py).

Usage: ``python tests/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR MODE...``

``steps``: a few train steps on the synthetic global batches of test_train,
each process feeding only its own slice through ``data.shard_batch``; both
checkpoint managers then save that state into ``OUT_DIR/work_steps`` and process
0 saves it to ``OUT_DIR/steps.npz``.
``loop``: ``train.train_and_evaluate`` on digits (prepared beforehand in
``OUT_DIR/tfds``) into the shared workdir ``OUT_DIR/work``, to exercise
checkpointing and evaluation with every process taking part.

The parent sets XLA_FLAGS for 2 CPU devices per process before JAX starts.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

STEPS = 3
STAGE = 'baseline'  # the gated model runs in `loop`; this keeps compiles short
GLOBAL_BATCH = 8


def initialize(port: int, process_id: int, num_processes: int) -> None:
  """Join the localhost cluster; gloo carries CPU collectives across processes."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}',
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  assert jax.process_count() == num_processes, jax.process_count()


def local_slice(batch: dict) -> dict:
  """This process's rows of a global batch (its devices hold that block of the mesh)."""
  n = GLOBAL_BATCH // jax.process_count()
  start = jax.process_index() * n
  return {k: v[start:start + n] for k, v in batch.items()}


def run_steps(out_dir: str) -> None:
  from test_train import synthetic_batches, tiny_config

  from fttw_jax import config as config_lib
  from fttw_jax import data, flops, parallel, train
  config = tiny_config(STAGE)
  mesh = parallel.make_mesh()
  model = config_lib.model_from_config(config, 10, bn_axis_name=parallel.AXIS)
  prof = flops.profile(config_lib.model_from_config(config, 10), (1, 32, 32, 3))
  tx = train.create_optimizer(config, 100, 1000)
  state = train.create_train_state(jax.random.key(0, impl='rbg'), model, tx, (32, 32, 3), mesh)
  step = train.make_train_step(mesh, model=model, tx=tx, config=config, prof=prof,
                               steps_per_epoch=100)
  for batch in synthetic_batches(STEPS, batch=GLOBAL_BATCH):
    state, metrics = step(state, data.shard_batch(local_slice(batch), mesh))
  save_both(out_dir, state, config)
  state, metrics = jax.device_get((state, metrics))  # replicated: every process has it all
  if jax.process_index() == 0:
    leaves = {jax.tree_util.keystr(p): np.asarray(v)
              for p, v in jax.tree.leaves_with_path((state, metrics))}
    np.savez(os.path.join(out_dir, 'steps.npz'), **leaves)


def save_both(out_dir: str, state, config) -> None:
  """The manager saves one step with its metrics, as the loop does, from every process."""
  from fttw_jax import checkpoint
  manager = checkpoint.create_manager(os.path.join(out_dir, 'work_steps'))
  host_vars, host_opt = jax.device_get((state.variables, state.opt_state))
  meta = {'stage': config.stage}
  checkpoint.save(manager, STEPS, host_vars, host_opt, config, meta, metrics={'top1': 0.5})
  manager.wait_until_finished()


def run_loop(out_dir: str) -> None:
  from test_train import loop_config

  from fttw_jax import train
  config = loop_config(os.path.join(out_dir, 'tfds'), max_steps=2, num_epochs=1,
                       eval_max_examples=64, batch_size=32, log_every_steps=1)
  result = train.train_and_evaluate(config, os.path.join(out_dir, 'work'))
  print(f'process {jax.process_index()} top1 {result["top1"]:.6f}', flush=True)


def main(argv):
  port, process_id, num_processes, out_dir, *modes = argv[1:]
  initialize(int(port), int(process_id), int(num_processes))
  for mode in modes:  # one start-up (imports, cluster) for several checks
    {'steps': run_steps, 'loop': run_loop}[mode](out_dir)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv)
