"""Mesh, shardings, multi-process start-up and host -> device prefetch.

One 1-D mesh ('data',) over all devices of all processes: batches are sharded over 'data' (leading axis),
parameters and optimizer state are replicated. Each process feeds its contiguous slice of the global batch
(process p holds global examples [p * B / P, (p + 1) * B / P) of every step), which
jax.make_array_from_process_local_data assembles into one global array without any cross-host copy.
"""

from __future__ import annotations

import collections
import copyreg
import os
import threading
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
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


def _pickle_as_none(obj) -> tuple:
  return type(None), ()


def _callbacks_pickle_as_none() -> None:
  """A compiled executable keeps its custom_partitioning callbacks alive (JAX's private _ShardingCallbackInfo,
  holding the lowering context) though only the partitioner, during the compile, uses them; they do not
  pickle, so `jax.experimental.serialize_executable` (jaxflow.exec_cache's warm starts) would fail on every
  sharded program that calls a `per_image` function. Registered by `per_image`: they pickle as None (the loaded
  executable never calls them). A JAX without that class leaves pickling as it is."""
  try:
    from jax._src.custom_partitioning import _ShardingCallbackInfo
  except ImportError:
    return
  copyreg.pickle(_ShardingCallbackInfo, _pickle_as_none)


def _parse_rule(rule: str) -> tuple[list[list[str]], list[list[str]], list[bool], list[bool]]:
  """A per-image rule's operand and result terms as lists of their named (per-image) factors, per operand whether
  it is whole (replicated: a term without '...'), and per result whether it is summed over the images (ditto)."""
  if rule.count("->") != 1:
    raise ValueError(f"per_image rule {rule!r} must have one '->' between operands and results")
  sides = [[term.split() for term in side.split(",")] for side in rule.split("->")]
  if not sides[0][0] or sides[0][0][0] != "...":
    raise ValueError(f"per_image rule {rule!r}: the first operand term must be '...' (the image axes) followed by "
                     f"the per-image factors, got {' '.join(sides[0][0])!r}")
  for term in sides[0] + sides[1]:
    if "..." in term[1:] or not term:
      raise ValueError(f"per_image rule {rule!r}: '...' may only lead a term, got {' '.join(term)!r}")
  whole, summed = ([t[0] != "..." for t in side] for side in sides)
  strip = lambda terms, flags: [t if f else t[1:] for t, f in zip(terms, flags)]
  return strip(sides[0], whole), strip(sides[1], summed), whole, summed


def per_image(fn: Callable[..., Any], rule: str) -> Callable[..., Any]:
  """`fn` made to run on each device's own images under a jit whose operands are sharded on their image axes.

  `fn(*operands)` must treat every leading axis as images: operand i is (..., *f_i) where f_i are the per-image
  factors named after '...' in `rule`'s i-th term (einsum-like, e.g. "... h w c, ... h w c -> ... h w k"; a
  factor name shared between terms has one size), and each result likewise; one result term gives one array,
  several give a tuple. A result term without '...' (e.g. "... n c, ... n k -> c k") is a sum over all the
  images (a weight gradient): `fn` returns its images' sum, and the devices' sums are added (an all-reduce of
  that result only). An operand term without '...' (not the first) is an operand every device gets whole (a
  kernel). Without this wrapper XLA's partitioner does not know how to split a custom call or a
  loop over the images, and all-gathers the batch onto every device.

  It is a `jax.experimental.custom_partitioning` whose Shardy rule keeps the image axes' sharding and needs the
  per-image factors replicated; `partition` asks for every operand and result with the first operand's
  image-axis sharding and replicated per-image axes (the partitioner reshards an operand that differs: correct,
  maybe slow) and calls `fn` on each device's images. Constants `fn` closes over (e.g. numpy gather indices,
  which custom_partitioning refuses) are passed to it as replicated operands. A one-device program inlines
  `fn`; a process with one device calls `fn` directly (no partitioner, no extra tracing). custom_partitioning
  has no batching rule, so a `custom_vmap` broadcasts unbatched operands and calls it again with the vmapped
  axis as one more leading image axis (no reshape: a batch sharding stays where it is); with a summed result it
  runs `jax.vmap(fn)` instead (not partitioned). Not differentiable: callers define the gradient (custom_vjp)
  with a second per_image function for the backward, as the ops do."""
  from jax.experimental.custom_partitioning import custom_partitioning
  operands, results, whole_ops, summed = _parse_rule(rule)
  _callbacks_pickle_as_none()
  single = len(results) == 1
  lhs, rhs = rule.split("->")

  def image_spec(first) -> tuple:
    spec = tuple(getattr(first.sharding, "spec", ())) + (None,) * len(first.shape)
    return spec[:len(first.shape) - len(operands[0])]

  def shardings(mesh, first, terms, whole=()):
    lead = image_spec(first)
    return [jax.sharding.NamedSharding(mesh, jax.P(*((None,) * len(t) if sm else (*lead, *(None,) * len(t)))))
            for t, sm in zip(terms, whole or (False,) * len(terms))]

  def infer(mesh, arg_shapes, result_shape):  # the GSPMD partitioner's rule (Shardy uses sharding_rule)
    out = shardings(mesh, arg_shapes[0], results, summed)
    return out[0] if single else tuple(out)

  def build(whole: Callable[..., Any], const_ranks: tuple[int, ...]):
    """The custom_partitioning of `whole` (fn on the global operands, then len(const_ranks) replicated operands:
    fn's hoisted constants); each device runs fn on its images (its constants traced again at that shape)."""
    consts = [[f"z{i}_{j}" for j in range(r)] for i, r in enumerate(const_ranks)]
    wrapped = custom_partitioning(whole)

    def partition(mesh, arg_shapes, result_shape):
      out = shardings(mesh, arg_shapes[0], results, summed)
      axes = tuple(a for entry in image_spec(arg_shapes[0]) if entry is not None
                   for a in ((entry,) if isinstance(entry, str) else entry))

      def lower(*args):
        res = fn(*args[:len(operands)])
        if not (axes and any(summed)):
          return res
        res = (res,) if single else tuple(res)
        res = tuple(jax.lax.psum(r, axes) if sm else r for r, sm in zip(res, summed))
        return res[0] if single else res

      args = (shardings(mesh, arg_shapes[0], operands, whole_ops)
              + shardings(mesh, arg_shapes[0], consts, (True,) * len(consts)))
      return mesh, lower, out[0] if single else tuple(out), tuple(args)

    full = lhs + "".join(f", {' '.join(t)}" for t in consts) + " ->" + rhs
    named = full.replace(",", " ").replace("->", " ").split()  # Shardy wants them in order of appearance
    wrapped.def_partition(partition, infer_sharding_from_operands=infer, propagate_user_sharding=None,
                          sharding_rule=full, need_replication_factors=tuple(dict.fromkeys(
                              f for f in named if f != "...")))
    return wrapped

  plain = build(fn, ())

  def partitioned(*args):
    # custom_partitioning takes no closed-over constants (e.g. numpy gather indices): they become operands.
    closed = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in args))
    if not closed.consts:
      return plain(*args)
    n = len(args)
    whole = lambda *a: jax.core.eval_jaxpr(closed.jaxpr, a[n:], *a[:n])
    out = build(lambda *a: whole(*a)[0] if single else tuple(whole(*a)),
                tuple(jnp.ndim(c) for c in closed.consts))(*args, *closed.consts)
    return out

  def call(*args):
    if len(args) != len(operands):
      raise ValueError(f"per_image({getattr(fn, '__name__', fn)}) with rule {rule!r} takes {len(operands)} "
                       f"operands, got {len(args)}")
    leads = set()
    for i, (a, term, wh) in enumerate(zip(args, operands, whole_ops)):
      if wh:
        if jnp.ndim(a) != len(term):
          raise ValueError(f"per_image rule {rule!r}: operand {i} ({' '.join(term)}) must have {len(term)} axes, "
                           f"got shape {jnp.shape(a)}")
        continue
      if jnp.ndim(a) < len(term) + 1:
        raise ValueError(f"per_image rule {rule!r}: operand {i} needs at least one image axis before its "
                         f"{len(term)} per-image axes ({' '.join(term)}), got shape {jnp.shape(a)}")
      leads.add(tuple(jnp.shape(a)[:jnp.ndim(a) - len(term)]))
    if len(leads) != 1:
      raise ValueError(f"per_image rule {rule!r}: the operands' image axes differ: {sorted(leads)}")
    if jax.device_count() == 1:  # nothing to partition: the plain call (no partitioner's tracing at compile)
      return fn(*args)
    return batched(*args)

  batched = jax.custom_batching.custom_vmap(partitioned)

  @batched.def_vmap
  def _rule(axis_size, in_batched, *args):
    out_batched = True if single else (True,) * len(results)
    if any(summed) or any(b and wh for b, wh in zip(in_batched, whole_ops)):
      # Not over the images (summed results, a whole operand that varies): fn per vmapped element.
      return jax.vmap(fn, in_axes=[0 if b else None for b in in_batched])(*args), out_batched
    args = [a if b or wh else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, b, wh in zip(args, in_batched, whole_ops)]
    return batched(*args), out_batched

  return call


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
