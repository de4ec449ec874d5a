r"""Command line: `python -m jaxflow.train --config configs/<model>.py[:variant] --workdir DIR [--config.k=v ...]`.

Examples:
  python -m jaxflow.train --config configs/pwcnet.py:local --workdir runs/pwcnet_local
  python -m jaxflow.train --config configs/flownet_c.py:chairs --workdir runs/flownet_c \
      --config.batch_size=16 --config.model.dtype=bfloat16
Several processes (e.g. two local CPU processes; on clusters use --distributed_auto instead):
  python -m jaxflow.train ... --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0
Restarting with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pwcnet.py:local.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed (several processes).")
flags.DEFINE_integer("num_processes", None, "Number of processes for jax.distributed.")
flags.DEFINE_integer("process_id", None, "Index of this process for jax.distributed.")
flags.DEFINE_bool("distributed_auto", False, "Call jax.distributed.initialize() with cluster auto-detection "
                  "(SLURM, Cloud TPU, MPI, ...).")
flags.DEFINE_integer("stop_after_steps", None, "Stop (with a checkpoint) after this many steps of this run.")
flags.DEFINE_string("compilation_cache", None, "Persistent XLA compilation cache directory (a second run of the "
                    "same configuration skips compilation); default $JAXFLOW_COMPILATION_CACHE or "
                    "~/.cache/jaxflow/xla; 'none' disables it.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/pwcnet.py:local")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from jaxflow import parallel, platform
  platform.configure_from_flag(FLAGS.compilation_cache)
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  auto=FLAGS.distributed_auto)
  # TensorFlow is not imported here: the trainer's input-pipeline thread imports it (data_pipelines.pipeline, which
  # also keeps TF off the accelerators), so its import overlaps the JAX side's start.
  from configs.common import check_config
  from jaxflow import trainer
  check_config(FLAGS.config)
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, stop_after_steps=FLAGS.stop_after_steps)
  except trainer.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
