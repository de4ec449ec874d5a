"""The C++ cost-volume kernel (jaxflow.ops.correlation_ffi, impl 'ffi'): values and gradients against the numpy
reference and the jnp paths, dtypes, jit / vmap / shard_map, a small PWC-Net, the fallback without a compiler or
with a failing build, the library's cache key, a warm start of an executable that calls it, and concurrent first
builds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow import parallel
from jaxflow.ops import correlation, correlation_ffi
from test_correlation import _features, _numpy_adjoint, numpy_correlation

_corr_mod = sys.modules["jaxflow.ops.correlation"]
pytestmark = pytest.mark.skipif(shutil.which(correlation_ffi.compiler()[0]) is None,
                                reason="no C++ compiler: the kernel cannot be built (the jnp path is used)")


@pytest.fixture(scope="module", autouse=True)
def kernel():
  if not correlation_ffi.enabled():
    pytest.skip(f"${correlation_ffi.ENV_SWITCH} switches the kernel off")
  assert correlation_ffi.available(), "a C++ compiler exists, so the kernel must build"


def _grads(impl, f1, f2, g, md, stride):
  out, vjp = jax.vjp(lambda a, b: correlation(a, b, md, stride, impl=impl), jnp.asarray(f1), jnp.asarray(f2))
  return [np.asarray(out)] + [np.asarray(x) for x in vjp(jnp.asarray(g))]


def _cotangent(shape, md, stride, seed):
  k = 2 * (md // stride) + 1
  return np.random.default_rng(seed).normal(size=shape[:3] + (k * k,)).astype(np.float32)


@pytest.mark.parametrize("shape,md,stride", [
    ((1, 9, 11, 1), 1, 1),       # C = 1, n = 1, odd H and W
    ((3, 13, 7, 3), 4, 1),       # batch 3, C = 3, W < 8 (one partial vector of pixels)
    ((1, 17, 19, 32), 4, 1),     # PWC-Net's n and smallest C, W = 2 vectors + 3
    ((3, 11, 21, 33), 4, 1),     # C = 33 (not a multiple of anything), batch 3
    ((1, 15, 23, 32), 10, 1),    # n = 10: K = 21 in two accumulator groups, window wider than the image
    ((2, 27, 33, 3), 20, 2),     # FlowNetC's stride 2 through the pixel phases, odd sizes (uneven phases)
])
def test_values_and_gradients_match_numpy_and_the_jnp_paths(shape, md, stride):
  f1, f2 = _features(shape, 61 + shape[-1])
  g = _cotangent(shape, md, stride, 62)
  ours = _grads("ffi", f1, f2, g, md, stride)
  e1, e2 = _numpy_adjoint(f1, f2, g, md, stride)
  np.testing.assert_allclose(ours[0], numpy_correlation(f1, f2, md, stride), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours[1], e1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours[2], e2, rtol=1e-4, atol=1e-5)
  for impl in ("scan", "tiled_gather"):  # float32 sums in other orders (up to 441 terms: FlowNetC's window)
    for a, r in zip(ours, _grads(impl, f1, f2, g, md, stride)):
      np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_exact_on_a_constructed_input():
  # f1 = 1 everywhere, f2 = the column index + 1 on every channel: out(y, x, i, j) = x + j - n + 1 where
  # y + i - n and x + j - n lie inside the image, else 0 (integers: exact in float32).
  b, h, w, c, n = 1, 5, 12, 4, 2
  k = 2 * n + 1
  f1 = np.ones((b, h, w, c), np.float32)
  f2 = np.broadcast_to((np.arange(w, dtype=np.float32) + 1)[None, None, :, None], (b, h, w, c)).copy()
  out = np.asarray(correlation(f1, f2, n, impl="ffi")).reshape(b, h, w, k, k)
  for y in range(h):
    for x in range(w):
      for i in range(k):
        for j in range(k):
          inside = 0 <= y + i - n < h and 0 <= x + j - n < w
          assert out[0, y, x, i, j] == ((x + j - n + 1) if inside else 0.0)


def test_the_kernel_is_what_tiled_means_on_cpu():
  f1, f2 = _features((2, 12, 16, 8), 63)
  hlo = lambda impl: jax.jit(lambda a, b: correlation(a, b, 4, impl=impl)).lower(f1, f2).as_text()
  assert correlation_ffi.TARGET_FWD in hlo("tiled") and correlation_ffi.TARGET_FWD in hlo("ffi")
  assert correlation_ffi.TARGET_FWD not in hlo("tiled_gather")
  grad_hlo = jax.jit(jax.grad(lambda a, b: jnp.sum(correlation(a, b, 4)), argnums=(0, 1))).lower(f1, f2).as_text()
  assert correlation_ffi.TARGET_BWD in grad_hlo


def test_bfloat16_inputs_float32_products_and_input_dtype_gradients():
  shape, md = (2, 11, 13, 24), 4
  f1, f2 = _features(shape, 64)
  b1, b2 = jnp.asarray(f1, jnp.bfloat16), jnp.asarray(f2, jnp.bfloat16)
  out = correlation(b1, b2, md, impl="ffi")
  assert out.dtype == jnp.float32
  exact = numpy_correlation(np.asarray(b1.astype(jnp.float32)), np.asarray(b2.astype(jnp.float32)), md, 1)
  np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-5, atol=1e-6)
  loss = lambda impl: jax.jit(jax.grad(lambda a, b: jnp.sum(correlation(a, b, md, impl=impl) ** 2), argnums=(0, 1)))
  for a, r in zip(loss("ffi")(b1, b2), loss("tiled_gather")(b1, b2)):
    assert a.dtype == jnp.bfloat16
    # Both round the same float32 gradient to bfloat16; float32 summation order may flip a rounding.
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), rtol=1e-2, atol=1e-3)


def test_float64_keeps_the_jnp_path():
  with jax.enable_x64(True):
    f1, f2 = (jnp.asarray(x, jnp.float64) for x in _features((1, 6, 7, 3), 65))
    out = correlation(f1, f2, 2, impl="ffi")
    assert out.dtype == jnp.float64
    assert correlation_ffi.TARGET_FWD not in jax.jit(lambda a, b: correlation(a, b, 2, impl="ffi")).lower(f1, f2).as_text()
    np.testing.assert_allclose(np.asarray(out), numpy_correlation(np.asarray(f1), np.asarray(f2), 2, 1), rtol=1e-12)


def test_vmap_jit_and_grad_agree_with_the_batched_call():
  shape, md = (2, 3, 9, 10, 5), 3   # vmap over 2, inner batch 3
  f1, f2 = _features(shape[1:], 66)
  f1 = np.stack([f1, f1[::-1]]); f2 = np.stack([f2, -f2])
  fn = lambda a, b: correlation(a, b, md, impl="ffi")
  vm = jax.jit(jax.vmap(fn))(f1, f2)
  for v in range(2):
    np.testing.assert_allclose(np.asarray(vm[v]), numpy_correlation(f1[v], f2[v], md, 1), rtol=1e-5, atol=1e-6)
  loss = lambda a, b: jnp.sum(jnp.sin(jax.vmap(fn)(a, b)))
  gv = jax.jit(jax.grad(loss, argnums=(0, 1)))(f1, f2)
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  gf = jax.grad(lambda a, b: jnp.sum(jnp.sin(correlation(a, b, md, impl="tiled_gather"))), argnums=(0, 1))(
      flat(f1), flat(f2))
  for a, r in zip(gv, gf):
    np.testing.assert_allclose(np.asarray(flat(a)), np.asarray(r), rtol=1e-5, atol=2e-6)


def test_shard_map_over_two_devices():
  assert len(jax.devices()) >= 2, "tests/conftest.py should simulate 2 CPU devices"
  mesh = jax.make_mesh((2,), ("data",))
  shape, md = (4, 10, 12, 7), 4
  f1, f2 = _features(shape, 67)
  spec = jax.P("data")
  sharded = jax.jit(jax.shard_map(lambda a, b: correlation(a, b, md, impl="ffi"), mesh=mesh, in_specs=(spec, spec),
                                  out_specs=spec))
  sharding = jax.NamedSharding(mesh, spec)
  s1, s2 = jax.device_put(f1, sharding), jax.device_put(f2, sharding)
  out = sharded(s1, s2)
  assert len(out.sharding.device_set) == 2
  np.testing.assert_allclose(np.asarray(out), numpy_correlation(f1, f2, md, 1), rtol=1e-5, atol=1e-6)
  loss = lambda fn: (lambda a, b: jnp.sum(fn(a, b) ** 2))
  with jax.set_mesh(mesh):
    g_sharded = jax.jit(jax.grad(loss(sharded), argnums=(0, 1)))(s1, s2)
  g_single = jax.grad(loss(lambda a, b: correlation(a, b, md, impl="tiled_gather")), argnums=(0, 1))(f1, f2)
  for a, r in zip(g_sharded, g_single):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_small_pwcnet_jitted_grad_equals_the_jnp_path(monkeypatch):
  from jaxflow.models import get_model
  from jaxflow.ops import conv as conv_ops
  # Two levels (the top one's cost volume of the features alone, the next one's of the warped features), as few
  # layers as the model allows, on XLA's own convolutions (the same in both runs): the compile is what costs here.
  model = get_model("pwcnet", search_range=4, pyramid_channels=(8, 16), estimator_channels=(8, 8),
                    context_channels=(8,), context_dilations=(1,), convs_per_level=1, output_level=1)
  rng = np.random.default_rng(8)
  im1, im2 = (jnp.asarray(rng.random((2, 64, 64, 3), np.float32)) for _ in range(2))
  # Parameters drawn here from their abstract shapes: XLA:CPU takes ~15-25 s to compile model.init's random
  # initialisers, more than the two steps below.
  shapes = jax.eval_shape(model.init, jax.random.key(0), im1, im2)
  scale = lambda shape: 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) > 1 else 0.01
  variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale(x.shape), x.dtype), shapes)

  def loss(params):
    flows = model.apply({**variables, "params": params}, im1, im2)["flows"]
    return sum(jnp.mean(jnp.square(f - 0.3)) for f in flows)

  def run(kernel: bool):
    jax.clear_caches()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(variables["params"])  # one trace + compile per path
    assert (correlation_ffi.TARGET_BWD in lowered.as_text()) == kernel
    return lowered.compile()(variables["params"])

  conv_ops.set_default_impl("lax")
  try:
    value, grads = run(True)
    monkeypatch.setattr(_corr_mod, "_CPU_TILED", "tiled_gather")
    ref_value, ref_grads = run(False)
  finally:
    conv_ops.set_default_impl("auto")
    jax.clear_caches()
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    scale = float(np.max(np.abs(np.asarray(r)))) + 1e-12
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(r) / scale, atol=2e-4)


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
  """The module as in a new process (nothing registered or tried yet), with an empty kernel cache; restored after."""
  monkeypatch.setattr(correlation_ffi, "_status", None)
  monkeypatch.setattr(correlation_ffi, "_builder", None)
  monkeypatch.setattr(correlation_ffi, "_compiler_version", {})
  monkeypatch.setenv(correlation_ffi.ENV_CACHE, str(tmp_path / "kernels"))
  return tmp_path


def _fallback_equals_jnp():
  f1, f2 = _features((1, 9, 10, 6), 69)
  g = _cotangent(f1.shape, 3, 1, 70)
  jax.clear_caches()
  got = _grads("ffi", f1, f2, g, 3, 1)
  hlo = jax.jit(lambda a, b: correlation(a, b, 3)).lower(f1, f2).as_text()
  assert correlation_ffi.TARGET_FWD not in hlo
  for a, r in zip(got, _grads("tiled_gather", f1, f2, g, 3, 1)):
    np.testing.assert_array_equal(a, r)
  jax.clear_caches()


def test_missing_compiler_warns_once_and_uses_jnp(fresh_kernel_state, monkeypatch):
  monkeypatch.setenv("CXX", "jaxflow-no-such-compiler++")
  with pytest.warns(RuntimeWarning, match="jaxflow-no-such-compiler\\+\\+.*could not be run"):
    assert correlation_ffi.available() is False
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no second warning
    assert correlation_ffi.available() is False and correlation_ffi.state() == "jnp"
    assert correlation_ffi.light_state() == "ffi-pending"
    _fallback_equals_jnp()


def test_failing_build_warns_with_the_command_and_stderr(fresh_kernel_state, monkeypatch):
  fake = fresh_kernel_state / "fakecc"
  fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fakecc 0.1"; exit 0; fi\n'
                  'echo "fakecc: error: this compiler builds nothing" >&2\nexit 3\n')
  fake.chmod(0o755)
  monkeypatch.setenv("CXX", str(fake))
  with pytest.warns(RuntimeWarning, match="(?s)fakecc.*correlation.cc.*exited with 3.*builds nothing"):
    assert correlation_ffi.available() is False
  assert not [p for p in os.listdir(fresh_kernel_state / "kernels") if p.endswith(".so")]  # no partial library
  _fallback_equals_jnp()


def test_switched_off_builds_nothing(fresh_kernel_state, monkeypatch):
  monkeypatch.setenv(correlation_ffi.ENV_SWITCH, "0")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert correlation_ffi.available() is False
    assert correlation_ffi.state() == "jnp" and correlation_ffi.light_state() == "jnp"
  assert not os.path.exists(fresh_kernel_state / "kernels")


def test_library_name_keys_source_compiler_jaxlib_and_cpu(monkeypatch):
  base = correlation_ffi.library_path()
  assert os.path.basename(base).startswith("correlation-") and base.endswith(".so")
  monkeypatch.setattr(correlation_ffi, "_cpu_id", lambda: "x86_64|another CPU|avx2 fma")
  assert correlation_ffi.library_path() != base
  monkeypatch.undo()
  monkeypatch.setitem(correlation_ffi._compiler_version, " ".join(correlation_ffi.compiler()), "c++ 99.0")
  assert correlation_ffi.library_path() != base
  monkeypatch.undo()
  assert correlation_ffi.library_path() == base


_WARM = textwrap.dedent("""
    import sys
    import jax
    from jaxflow import exec_cache                       # registers a built kernel before the load below
    pending = exec_cache.prefetch("corr", {"t": "ffi"}, sys.argv[1])
    import jax.numpy as jnp
    import numpy as np
    from jaxflow.ops import correlation
    f = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(correlation(a, b, 4))), argnums=(0, 1)))
    fn = exec_cache.CachedFunction(f, "corr", {"t": "ffi"}, sys.argv[1], prefetched=pending, log=lambda m: None)
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=(2, 16, 24, 8)).astype(np.float32)) for _ in range(2))
    value, (g1, g2) = fn(a, b)
    print("RESULT", fn.hit, "ffi" in exec_cache.environment()["correlation_kernel"], repr(float(value)),
          repr(float(jnp.sum(g1 * g1) + jnp.sum(g2))))
""")


def test_warm_start_loads_an_executable_that_calls_the_kernel(tmp_path):
  # Three fresh processes sharing an executable cache: the first compiles and stores, the second loads it in the
  # background (the kernel registered before the load) and gets the same numbers; one with the kernel switched
  # off has another key (never loads the executable that calls the kernel) and gets the jnp path's numbers.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def run(**extra):
    proc = subprocess.run([sys.executable, "-c", _WARM, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**env, **extra})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1].split()
    return line[1] == "True", line[2] == "True", float(line[3]), float(line[4])

  first, second = run(), run()
  assert first[:2] == (False, True) and second[:2] == (True, True)
  assert first[2:] == second[2:]
  off = run(**{correlation_ffi.ENV_SWITCH: "0"})
  assert off[:2] == (False, False)
  np.testing.assert_allclose(off[2:], first[2:], rtol=1e-5)


def test_concurrent_first_builds_leave_one_complete_library(tmp_path):
  # Two fresh processes build into the same empty cache at once (each compiles to its own temp file and renames
  # it into place): all load a working kernel, one library remains and no temp file is left behind.
  script = ("import jax, numpy as np\n"
            "from jaxflow.ops import correlation, correlation_ffi\n"
            "assert correlation_ffi.available()\n"
            "x = np.arange(2 * 5 * 6 * 3, dtype=np.float32).reshape(2, 5, 6, 3) / 50\n"
            "print('SUM', float(correlation(x, x[::-1], 2, impl='ffi').sum()))\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", correlation_ffi.ENV_CACHE: str(tmp_path / "kernels")}
  procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env) for _ in range(2)]
  sums = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    sums.append(float(out.split("SUM")[-1]))
  x = np.arange(2 * 5 * 6 * 3, dtype=np.float32).reshape(2, 5, 6, 3) / 50
  np.testing.assert_allclose(sums, [numpy_correlation(x, x[::-1], 2, 1).sum()] * 2, rtol=1e-5)
  files = os.listdir(tmp_path / "kernels")
  assert len(files) == 1 and files[0].startswith("correlation-") and files[0].endswith(".so"), files


def _kernel_calls(hlo: str) -> list[str]:
  """The compiled HLO's instructions that call the kernel (forward or backward)."""
  return [line for line in hlo.splitlines()
          if f'custom_call_target="{correlation_ffi.TARGET_FWD}"' in line
          or f'custom_call_target="{correlation_ffi.TARGET_BWD}"' in line]


@pytest.mark.parametrize("stride,md", [(1, 4), (2, 4)])  # PWC-Net's stride 1; FlowNetC's stride 2 (pixel phases)
def test_batch_sharded_jit_runs_the_kernel_on_each_devices_images(stride, md, tmp_path):
  # The trainer's data parallelism: plain jit, batch sharded on 'data', no shard_map. Each device must run the
  # kernel on its own 2 of the 4 images (per phase for stride 2), forward and backward, with no all-gather or
  # all-to-all of the features, and give the single-device values and gradients.
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates them)")
  mesh = parallel.make_mesh(2)  # the trainer's mesh (Auto axes)
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  shape = (4, 12, 14, 6)
  f1, f2 = _features(shape, 71)
  g = _cotangent(shape, md, stride, 72)
  fwd = jax.jit(lambda a, b: correlation(a, b, md, stride, impl="ffi"), in_shardings=(sharding, sharding),
                out_shardings=sharding)
  loss = lambda a, b: jnp.sum(correlation(a, b, md, stride, impl="ffi") * g)
  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(sharding, sharding),
               out_shardings=(None, (sharding, sharding)))
  s1, s2 = jax.device_put(f1, sharding), jax.device_put(f2, sharding)
  k = 2 * (md // stride) + 1
  per_device = 2 * stride * stride  # images per device the kernel sees (the phases are images too)
  for jitted, targets in ((fwd, {correlation_ffi.TARGET_FWD}),
                          (vg, {correlation_ffi.TARGET_FWD, correlation_ffi.TARGET_BWD})):
    hlo = jitted.lower(s1, s2).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    calls = _kernel_calls(hlo)
    assert {t for t in targets if any(t in c for c in calls)} == targets, calls
    for c in calls:  # every operand and result of the call holds the per-device images only
      shapes = [tuple(int(d) for d in m.split(",")) for m in __import__("re").findall(r"f32\[([0-9,]+)\]", c)]
      assert shapes and all(s[0] == per_device for s in shapes), c
  out = fwd(s1, s2)
  assert out.sharding.is_equivalent_to(sharding, 4)
  np.testing.assert_allclose(np.asarray(out), numpy_correlation(f1, f2, md, stride), rtol=1e-5, atol=1e-6)
  value, (d1, d2) = vg(s1, s2)
  e1, e2 = _numpy_adjoint(f1, f2, g, md, stride)
  np.testing.assert_allclose(float(value), float(np.sum(numpy_correlation(f1, f2, md, stride) * g)), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(d1), e1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d2), e2, rtol=1e-4, atol=1e-5)
  assert k * k == out.shape[-1]
  if stride == 1:  # the sharded program round-trips through exec_cache (warm starts of a multi-device trainer)
    from jaxflow import exec_cache
    path = str(tmp_path / "vg.jaxexec")
    exec_cache.store(path, vg.lower(s1, s2).compile())
    loaded_value, (l1, l2) = exec_cache.load(path)(s1, s2)
    assert float(loaded_value) == float(value)
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(d1))
    np.testing.assert_array_equal(np.asarray(l2), np.asarray(d2))


def test_a_sharded_height_is_resharded_and_vmap_inside_sharded_jit_works():
  # H sharded (the kernel needs whole images): correct values, the kernel sees full-height maps. And vmap inside
  # a batch-sharded jit (the custom_vmap rule): the kernel sees the vmapped axis and the per-device images.
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates them)")
  mesh = parallel.make_mesh(2)  # the trainer's mesh (Auto axes)
  f1, f2 = _features((2, 12, 10, 5), 73)
  by_h = jax.NamedSharding(mesh, jax.P(None, "data"))
  fn = jax.jit(lambda a, b: correlation(a, b, 3, impl="ffi"), in_shardings=(by_h, by_h))
  hlo = fn.lower(f1, f2).compile().as_text()
  assert all("f32[2,12,10," in c for c in _kernel_calls(hlo)), _kernel_calls(hlo)
  np.testing.assert_allclose(np.asarray(fn(f1, f2)), numpy_correlation(f1, f2, 3, 1), rtol=1e-5, atol=1e-6)
  v1, v2 = np.stack([f1, f2]), np.stack([f2, f1])   # (vmap 2, batch 2, ...) sharded on the batch
  by_b = jax.NamedSharding(mesh, jax.P(None, "data"))
  vm = jax.jit(jax.vmap(lambda a, b: correlation(a, b, 3, impl="ffi")), in_shardings=(by_b, by_b))
  calls = _kernel_calls(vm.lower(v1, v2).compile().as_text())
  assert calls and all("f32[2,1,12,10,49]" in c for c in calls), calls
  out = np.asarray(vm(v1, v2))
  for v in range(2):
    np.testing.assert_allclose(out[v], numpy_correlation(v1[v], v2[v], 3, 1), rtol=1e-5, atol=1e-6)


def test_a_build_removes_temp_files_of_killed_builds_but_not_recent_ones(fresh_kernel_state, monkeypatch):
  kernels = fresh_kernel_state / "kernels"
  kernels.mkdir()
  stale, recent, other = (kernels / ".tmp-correlation-old.so", kernels / ".tmp-correlation-new.so",
                          kernels / "notes.so")
  for p in (stale, recent, other):
    p.write_bytes(b"partial")
  two_hours_ago = os.stat(recent).st_mtime - 7200
  os.utime(stale, (two_hours_ago, two_hours_ago))
  os.utime(other, (two_hours_ago, two_hours_ago))
  # A compiler that fails the build (fast): the build still starts, so it clears the stale temp file first.
  fake = fresh_kernel_state / "fakecc"
  fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fakecc 0.2"; exit 0; fi\nexit 1\n')
  fake.chmod(0o755)
  monkeypatch.setenv("CXX", str(fake))
  with pytest.warns(RuntimeWarning, match="exited with 1"):
    assert correlation_ffi.available() is False
  assert sorted(os.listdir(kernels)) == sorted([recent.name, other.name])  # its own temp file is gone too
  assert correlation_ffi.remove_stale_temps(str(kernels), older_than=-1.0) == [str(recent)]
  assert correlation_ffi.remove_stale_temps(str(kernels / "missing")) == []
