"""Mesh, shardings, multi-process start-up and host -> device prefetch.

One 1-D mesh ('data',) over all devices of all processes: batches are sharded over 'data' (leading axis),
parameters and optimizer state are replicated. Each process feeds its contiguous slice of the global batch
(process p holds global examples [p * B / P, (p + 1) * B / P) of every step), which
jax.make_array_from_process_local_data assembles into one global array without any cross-host copy.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Iterable, Iterator

import jax
import numpy as np

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> bool:
  """Starts jax.distributed when several processes are configured; returns True if it was started.

  Explicit arguments (or JAXFLOW_COORDINATOR / JAXFLOW_NUM_PROCESSES / JAXFLOW_PROCESS_ID) start a
  coordinator-based cluster, e.g. several local CPU processes; `auto=True` lets
  jax.distributed.initialize() detect a cluster environment itself (SLURM, Cloud TPU, MPI, ...).
  Must be called before any other JAX call.
  """
  coordinator_address = coordinator_address or os.environ.get("JAXFLOW_COORDINATOR") or None
  if num_processes is None and os.environ.get("JAXFLOW_NUM_PROCESSES"):
    num_processes = int(os.environ["JAXFLOW_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAXFLOW_PROCESS_ID"):
    process_id = int(os.environ["JAXFLOW_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs num_processes and process_id as well "
                       f"(got num_processes={num_processes}, process_id={process_id})")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if num_processes not in (None, 1) or process_id not in (None, 0):
    raise ValueError(f"num_processes={num_processes}, process_id={process_id} given without a coordinator address")
  if auto:
    jax.distributed.initialize()
    return True
  return False


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A ('data',) mesh over all devices (or over the first `num_devices` local devices, single process only)."""
  # Auto axes: XLA's sharding propagation places the intermediates (JAX 0.10's default for make_mesh is
  # Explicit, which would ask every model op to spell out its output sharding).
  auto = (jax.sharding.AxisType.Auto,)
  if num_devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=auto)
  if jax.process_count() > 1:
    raise ValueError("num_devices is only supported in a single process")
  if not 1 <= num_devices <= jax.device_count():
    raise ValueError(f"num_devices={num_devices} but {jax.device_count()} devices are available")
  return jax.sharding.Mesh(np.asarray(jax.devices()[:num_devices]), (DATA_AXIS,), axis_types=auto)


def data_sharding(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  return jax.NamedSharding(mesh, jax.P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  return jax.NamedSharding(mesh, jax.P())


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  """The per-process batch size; raises if the global batch does not split over devices and processes."""
  devices = mesh.devices.size
  if global_batch % devices:
    raise ValueError(f"config.batch_size={global_batch} must be a multiple of the number of devices ({devices})")
  return global_batch // jax.process_count()


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Per-process numpy batch (leading axis = this process's slice) -> global arrays sharded over 'data'."""
  sharding = data_sharding(mesh)
  n = jax.process_count()
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_shape = (value.shape[0] * n,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


class Prefetcher:
  """Iterates global device batches built `size` steps ahead by a background thread.

  The thread pulls host numpy batches from `iterator`, turns them into global arrays (host -> device copies
  overlap the running step) and queues them; exceptions in the thread are re-raised by __next__.
  `close()` stops the thread.
  """

  _END = object()

  def __init__(self, iterator: Iterable[dict[str, np.ndarray]], mesh: jax.sharding.Mesh, size: int = 2):
    self._it = iter(iterator)
    self._mesh = mesh
    self._queue: collections.deque = collections.deque()
    self._cv = threading.Condition()
    self._size = max(1, size)
    self._stop = False
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, daemon=True, name="jaxflow-prefetch")
    self._thread.start()

  def _run(self) -> None:
    try:
      for batch in self._it:
        item = to_global(batch, self._mesh)
        with self._cv:
          while len(self._queue) >= self._size and not self._stop:
            self._cv.wait()
          if self._stop:
            return
          self._queue.append(item)
          self._cv.notify_all()
      item = self._END
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      self._error = e
      item = self._END
    with self._cv:
      self._queue.append(item)
      self._cv.notify_all()

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    with self._cv:
      while not self._queue:
        self._cv.wait()
      item = self._queue[0]
      if item is self._END:
        if self._error is not None:
          raise RuntimeError(f"input pipeline failed: {self._error!r}") from self._error
        raise StopIteration
      self._queue.popleft()
      self._cv.notify_all()
      return item

  def close(self) -> None:
    with self._cv:
      self._stop = True
      self._queue.clear()
      self._cv.notify_all()
    self._thread.join(timeout=5)


def allgather_flag(flag: bool) -> bool:
  """True if `flag` is True on any process (a tiny collective; only call it at synchronisation points)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return bool(np.any(flags))
