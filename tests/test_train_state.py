"""Parameter initialisation without a compiled forward pass (jaxflow.param_init via create_train_state):
distributions per leaf against the initialisers' formulas (independent numpy), determinism per seed, the tree
against model.init's, the optimiser state, sharding, and loud failures on unknown initialisers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow import optim, parallel, param_init
from jaxflow.models import get_model, list_models
from jaxflow.train_state import INIT_SIZE, create_train_state, make_init_fn, make_key

SHAPE = (1, INIT_SIZE, INIT_SIZE, 3)


def _tx():
  return optim.make_optimizer(optim.default_config(), 100)


def _leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def states():
  """name -> (state seed 0, state seed 0 again, state seed 1) on one device."""
  rep = parallel.replicated(parallel.make_mesh(1))
  out = {}
  for name in list_models():
    model = get_model(name, batch_norm=True) if name == "flownet_s" else get_model(name)
    variables = param_init.abstract_variables(model, SHAPE)
    init_fn = make_init_fn(model, _tx(), SHAPE, variables=variables)
    out[name] = (model, [create_train_state(init_fn, seed, rep)[0] for seed in (0, 0, 1)])
  return out


@pytest.mark.parametrize("name", ["flownet_s", "flownet_c", "spynet", "pwcnet"])
def test_tree_shapes_dtypes_equal_model_init(states, name):
  model, (state, _, _) = states[name]
  images = jnp.zeros(SHAPE, jnp.float32)
  ref = jax.eval_shape(lambda k: model.init({"params": k}, images, images, train=False), jax.random.key(0))
  for collection in ("params", "batch_stats"):
    got = getattr(state, collection)
    want = ref.get(collection, {})
    assert jax.tree.structure(got) == jax.tree.structure(want), collection
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.shape == w.shape and g.dtype == w.dtype


@pytest.mark.parametrize("name", ["flownet_s", "flownet_c", "spynet", "pwcnet"])
def test_each_leaf_follows_he_normal_or_constant(states, name):
  """Kernels N(0, 2 / fan_in) with fan_in = kh * kw * C_in (He), biases 0, BN scale 1 and statistics 0 / 1."""
  _, (state, _, _) = states[name]
  zs = []
  n_kernels = 0
  for path, x in _leaves(state.params).items():
    if path.endswith("['kernel']"):
      n_kernels += 1
      assert x.ndim == 4, path
      fan_in = x.shape[0] * x.shape[1] * x.shape[2]
      std = np.sqrt(2.0 / fan_in)
      z = x.astype(np.float64).ravel() / std
      zs.append(z)
      if z.size >= 20000:  # per-leaf check where the sample is large: std within 3 %, mean within 5 sigma
        assert abs(z.std() - 1.0) < 0.03, (path, z.std())
        assert abs(z.mean()) < 5.0 / np.sqrt(z.size), (path, z.mean())
    elif path.endswith("['bias']"):
      np.testing.assert_array_equal(x, 0.0, err_msg=path)
    elif path.endswith("['scale']"):
      np.testing.assert_array_equal(x, 1.0, err_msg=path)
    else:
      raise AssertionError(f"unexpected parameter {path}")
  assert n_kernels > 0
  z = np.concatenate(zs)  # all kernels pooled, in units of their own std
  assert abs(z.std() - 1.0) < 0.01 and abs(z.mean()) < 5.0 / np.sqrt(z.size)
  assert abs(np.mean(np.abs(z) > 2.0) - 0.0455) < 0.005  # normal tails (not truncated, not uniform)
  for path, x in _leaves(state.batch_stats).items():
    np.testing.assert_array_equal(x, 0.0 if path.endswith("['mean']") else 1.0, err_msg=path)
  if name == "flownet_s":
    assert any(p.endswith("['scale']") for p in _leaves(state.params)) and _leaves(state.batch_stats)


@pytest.mark.parametrize("name", ["spynet", "pwcnet"])
def test_same_seed_same_values_other_seed_different(states, name):
  _, (a, b, c) = states[name]
  la, lb, lc = _leaves(a.params), _leaves(b.params), _leaves(c.params)
  for path in la:
    np.testing.assert_array_equal(la[path], lb[path], err_msg=path)
    if path.endswith("['kernel']"):
      assert not np.array_equal(la[path], lc[path]), path
      # streams per leaf are independent: no two kernels of one state share their leading values
  firsts = {tuple(v.ravel()[:4]) for p, v in la.items() if p.endswith("['kernel']")}
  assert len(firsts) == sum(p.endswith("['kernel']") for p in la)


def test_optimizer_state_step_and_run_key(states):
  _, (state, _, other) = states["pwcnet"]
  want = jax.eval_shape(_tx().init, state.params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), 0)  # Adam moments and counts start at zero
  assert int(state.step) == 0 and int(state.bad_step) == -1
  for seed, st in ((0, state), (1, other)):
    expect = jax.random.key_data(jax.random.split(make_key(seed))[1])
    np.testing.assert_array_equal(np.asarray(st.rng), np.asarray(expect))


def test_two_device_placement_and_abstract_state():
  mesh = parallel.make_mesh(2)
  rep = parallel.replicated(mesh)
  model = get_model("spynet")
  state, abstract = create_train_state(make_init_fn(model, _tx(), SHAPE), 3, rep)
  one, _ = create_train_state(make_init_fn(model, _tx(), SHAPE), 3, parallel.replicated(parallel.make_mesh(1)))
  for a, s, o in zip(jax.tree.leaves(state), jax.tree.leaves(abstract), jax.tree.leaves(one)):
    assert a.sharding == rep and s.sharding == rep and a.shape == s.shape and a.dtype == s.dtype
    assert len(a.addressable_shards) == 2
    for shard in a.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(o))


class _Custom(nn.Module):
  @nn.compact
  def __call__(self, image1, image2, train=False):
    del train
    return nn.Dense(3, kernel_init=lambda key, shape, dtype: jnp.zeros(shape, dtype))(image1 - image2)


class _RawParam(nn.Module):
  @nn.compact
  def __call__(self, image1, image2, train=False):
    del train
    gain = self.param("gain", lambda key, shape: jnp.full(shape, 0.5), (3,))
    return image1 * gain


def test_unknown_initializer_is_an_error_naming_the_parameter():
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel.*does not know"):
    param_init.abstract_variables(_Custom(), SHAPE)
  with pytest.raises(ValueError, match=r"params/gain"):
    param_init.abstract_variables(_RawParam(), SHAPE)
  # The traced path still initialises such models (also with precomputed abstract variables of another model).
  state, _ = create_train_state(make_init_fn(_RawParam(), _tx(), SHAPE), 0,
                                parallel.replicated(parallel.make_mesh(1)), method="traced")
  np.testing.assert_array_equal(np.asarray(state.params["gain"]), 0.5)


class _Various(nn.Module):
  @nn.compact
  def __call__(self, image1, image2, train=False):
    del train
    x = nn.Conv(40, (3, 3))(image1)                                                  # lecun_normal (truncated)
    x = nn.Conv(50, (3, 3), kernel_init=nn.initializers.glorot_uniform())(x)          # uniform
    x = nn.ConvTranspose(30, (4, 4), kernel_init=nn.initializers.variance_scaling(0.5, "fan_out", "normal"))(x)
    return x + image2.mean()


def test_truncated_normal_uniform_and_fan_out_rules():
  variables, rules = param_init.abstract_variables(_Various(), SHAPE)
  vals = _leaves(param_init.host_variables(variables, rules, 0)["params"])
  t = vals["['Conv_0']['kernel']"].astype(np.float64)  # (3, 3, 3, 40): fan_in 27
  s = np.sqrt(1.0 / 27)
  assert np.abs(t).max() <= 2 * s / param_init.TRUNCATED_NORMAL_STD + 1e-6
  assert abs(t.std() / s - 1.0) < 0.06
  u = vals["['Conv_1']['kernel']"].astype(np.float64)  # (3, 3, 40, 50): fan_in 360, fan_out 450
  lim = np.sqrt(6.0 / (360 + 450))
  assert np.abs(u).max() <= lim and np.abs(u).max() > 0.99 * lim
  assert abs(u.std() / (lim / np.sqrt(3)) - 1.0) < 0.03
  n = vals["['ConvTranspose_0']['kernel']"].astype(np.float64)  # (4, 4, 50, 30): fan_out 16 * 30
  assert abs(n.std() / np.sqrt(0.5 / 480) - 1.0) < 0.03
  np.testing.assert_array_equal(vals["['Conv_1']['bias']"], 0.0)


def test_bad_method_is_an_error():
  with pytest.raises(ValueError, match="method"):
    create_train_state(make_init_fn(get_model("spynet"), _tx(), SHAPE), 0,
                       parallel.replicated(parallel.make_mesh(1)), method="fast")



def test_traced_method_same_tree_and_run_key_as_host_method():
  """method='traced' (a compiled model.init with jax's draws) and the host method build the same tree, shapes,
  dtypes and run key; an InitFn carrying precomputed variables can be traced too."""
  model = _Various()
  rep = parallel.replicated(parallel.make_mesh(1))
  init_fn = make_init_fn(model, _tx(), SHAPE, variables=param_init.abstract_variables(model, SHAPE))
  host, _ = create_train_state(init_fn, 5, rep)
  traced, _ = create_train_state(init_fn, 5, rep, method="traced")
  assert jax.tree.structure(host) == jax.tree.structure(traced)
  for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(traced)):
    assert a.shape == b.shape and a.dtype == b.dtype
  np.testing.assert_array_equal(np.asarray(host.rng), np.asarray(traced.rng))


def test_threaded_draws_equal_serial_draws():
  """host_variables draws leaves in threads: every thread count gives the same values (one stream per leaf),
  and each leaf equals param_init.draw of its own (seed, path)."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(16, (3, 3), kernel_init=nn.initializers.kaiming_normal())(x)
      x = nn.Conv(8, (3, 3), kernel_init=nn.initializers.truncated_normal(0.1))(x)
      return nn.Dense(4, kernel_init=nn.initializers.lecun_uniform())(x)

  model = Net()
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  abstract = {k: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), v) for k, v in abstract.items()}
  leaves = list(param_init._leaves(abstract))
  rules = {key: param_init.InitRule("normal", 0.5) for _, _, key, _ in leaves}
  serial = param_init.host_variables(abstract, rules, 3, threads=1)
  for threads in (2, 5):
    got = param_init.host_variables(abstract, rules, 3, threads=threads)
    assert jax.tree.structure(got) == jax.tree.structure(serial)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(serial)):
      np.testing.assert_array_equal(a, b)
  for (_, _, key, leaf), value in zip(leaves, jax.tree.leaves(serial)):
    np.testing.assert_array_equal(value, param_init.draw(rules[key], tuple(leaf.shape), leaf.dtype, 3, key))
  assert len({float(v.ravel()[0]) for v in jax.tree.leaves(serial)}) == len(leaves)  # distinct streams


def test_prefetched_host_draws_equal_the_state_drawn_in_place(tmp_path):
  """param_init.prefetch_host_variables draws, from the tree the lookup parts led to last, exactly the values
  create_train_state would draw; it is used only for that tree and seed, and finds nothing before a first run."""
  rep = parallel.replicated(parallel.make_mesh(1))
  model = get_model("spynet", levels=2)
  lookup = {"config": "spynet levels=2"}
  assert param_init.prefetch_host_variables(lookup, 0, str(tmp_path)) is None  # nothing recorded yet
  variables = param_init.abstract_variables(model, SHAPE, cache_dir=str(tmp_path), lookup_parts=lookup)
  init_fn = make_init_fn(model, _tx(), SHAPE, variables=variables)
  plain = _leaves(create_train_state(init_fn, 0, rep)[0].params)
  pending = param_init.prefetch_host_variables(lookup, 0, str(tmp_path))
  assert pending is not None
  assert pending.result(*variables, 1) is None  # another seed: not these values
  drawn = param_init.host_variables(*variables, 0)
  for a, b in zip(jax.tree.leaves(pending.result(*variables, 0)), jax.tree.leaves(drawn)):
    np.testing.assert_array_equal(a, b)
  pending = param_init.prefetch_host_variables(lookup, 0, str(tmp_path))
  early = _leaves(create_train_state(init_fn, 0, rep, host_prefetch=pending)[0].params)
  assert pending.used
  assert early.keys() == plain.keys()
  for k in plain:
    np.testing.assert_array_equal(early[k], plain[k])
  # Another model's tree under the same lookup parts (the pointer now names it): the old handle is not used.
  other = get_model("spynet", levels=3)
  other_vars = param_init.abstract_variables(other, SHAPE, cache_dir=str(tmp_path), lookup_parts=lookup)
  assert pending.result(*other_vars, 0) is None
  assert param_init.prefetch_host_variables(lookup, 0, str(tmp_path)).rows == param_init._to_json(*other_vars)
  # Without flax: the early draws run right after `import jax`.
  import subprocess
  import sys
  code = ("import sys; from jaxflow import param_init; "
          "print('flax' in sys.modules, param_init.prefetch_host_variables({'config': 'x'}, 0, sys.argv[1]))")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "False None"


@pytest.mark.parametrize("seed", [0, 1, 42, 2 ** 31 - 1, np.int32(7), np.int64(12345)])
def test_make_key_equals_jax_seeding(seed):
  # make_key builds the 'rbg' key data on the host for seeds in [0, 2**31): the same key (data, dtype, shape,
  # placement) as jax.random.key's compiled seeding, so the run key and every draw from it are unchanged.
  from jaxflow import exec_cache
  ours, ref = make_key(seed), jax.random.key(int(seed), impl="rbg")
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(ours)), np.asarray(jax.random.key_data(ref)))
  assert ours.dtype == ref.dtype and ours.shape == ref.shape and ours.committed == ref.committed
  assert exec_cache.signature((ours,)) == exec_cache.signature((ref,))  # the same executable cache key
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(jax.random.split(ours))),
                                np.asarray(jax.random.key_data(jax.random.split(ref))))


def test_make_key_other_seeds_take_jax_seeding():
  for seed in (-3, 2 ** 31):
    try:
      ref = jax.random.key(seed, impl="rbg")
    except OverflowError:
      with pytest.raises(OverflowError):
        make_key(seed)
      continue
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(make_key(seed))),
                                  np.asarray(jax.random.key_data(ref)))
