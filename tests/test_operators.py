"""The operator core against exact matrices from jax.hessian and jax.jacobian.

Every curvature kind's matvec is checked against its dense matrix, built
independently in float64; a user's own operators (a dense matrix, a Fisher
written as a pytree product) run through every algorithm.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

import adahessian_optax as aho
from adahessian_optax import _programs


def _problem(n=10):
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(3, 4)) / np.sqrt(3),
            "b1": 0.1 * rng.normal(size=(4,)),
            "w2": rng.normal(size=(4, 3)) / 2}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, n))
  return params, x, y


def _logits(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _per_example(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y)


def _loss(params, batch):
  return jnp.mean(_per_example(params, *batch))


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def _exact_matrices(params, x, y):
  """Hessian, GGN and empirical Fisher in float64, each built its own way."""
  flat, unravel = ravel_pytree(params)
  hess = jax.hessian(lambda f: _loss(unravel(f), (x, y)))(flat)
  jac = jax.jacobian(lambda f: _logits(unravel(f), x).reshape(-1))(flat)
  logits = _logits(params, x)
  h_out = jax.hessian(lambda o: optax.softmax_cross_entropy_with_integer_labels(
      o.reshape(logits.shape), y).mean())(logits.reshape(-1))
  j_losses = jax.jacobian(lambda f: _per_example(unravel(f), x, y))(flat)
  hess, jac, h_out, j_losses = (np.asarray(a, np.float64)
                                for a in (hess, jac, h_out, j_losses))
  return {"hessian": hess, "ggn": jac.T @ h_out @ jac,
          "fisher": j_losses.T @ j_losses / x.shape[0]}


@functools.lru_cache(maxsize=None)
def _reference():
  params, x, y = _problem()
  return params, x, y, _exact_matrices(params, x, y)


def _kinds(x, y):
  return {
      "hessian": lambda p: _loss(p, (x, y)),
      "ggn": aho.ggn(lambda p: _logits(p, x), aho.SoftmaxCrossEntropy(y)),
      "fisher": aho.empirical_fisher(lambda p: _per_example(p, x, y)),
  }


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_each_kinds_matvec_and_top_eigenvalues_are_its_exact_matrix(kind):
  params, x, y, exact = _reference()
  matrix = exact[kind]
  op = aho.curvature_operator(_kinds(x, y)[kind], params)
  assert op.size == matrix.shape[0]
  v = jax.tree.map(lambda a: jnp.asarray(
      np.random.default_rng(1).normal(size=a.shape), jnp.float32), params)
  np.testing.assert_allclose(_flat(op.matvec(v)), matrix @ _flat(v),
                             rtol=1e-4, atol=1e-6)
  values = aho.eigenpairs(op, key=0, k=3).values
  np.testing.assert_allclose(values, np.linalg.eigvalsh(matrix)[::-1][:3],
                             rtol=1e-4, atol=1e-6)
  if kind != "hessian":  # PSD: the most negative eigenvalue is ~0
    low = aho.eigenpairs(op, key=0, which="smallest").values[0]
    assert low > -1e-5 * values[0]


def test_empirical_fisher_over_a_dataset_weights_batches_by_size():
  params, x, y, exact = _reference()
  fisher = aho.empirical_fisher(lambda p, b: _per_example(p, *b))
  data = aho.DatasetLoss(fisher, [(x[:4], y[:4]), (x[4:8], y[4:8]),
                                  (x[8:], y[8:])])
  op = aho.curvature_operator(data, params)
  v = jax.tree.map(jnp.ones_like, params)
  np.testing.assert_allclose(_flat(op.matvec(v)), exact["fisher"] @ _flat(v),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(data(params)), float(_loss(params, (x, y))),
                             rtol=1e-6)


@pytest.mark.parametrize("method, rtol", [("forward", 3e-3),
                                          ("central", 2e-4)])
def test_finite_difference_product_is_close_to_the_exact_one(method, rtol):
  params, x, y, exact = _reference()
  fd = aho.finite_difference(lambda p: _loss(p, (x, y)), method=method)
  op = aho.curvature_operator(fd, params)
  v = jax.tree.map(lambda a: jnp.asarray(
      np.random.default_rng(2).normal(size=a.shape), jnp.float32), params)
  want = exact["hessian"] @ _flat(v)
  got = _flat(op.matvec(v))
  assert np.linalg.norm(got - want) <= rtol * np.linalg.norm(want)
  np.testing.assert_allclose(
      aho.eigenpairs(op, key=0).values,
      np.linalg.eigvalsh(exact["hessian"])[-1:], rtol=10 * rtol)


def _symmetric(n, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eigenvalues = np.concatenate([[9.0, 5.0, -4.0], np.linspace(-1, 2, n - 3)])
  return (q * eigenvalues) @ q.T


def _dense_operator(a, like):
  ravel = lambda t: ravel_pytree(t)[0]
  unravel = ravel_pytree(like)[1]
  m = jnp.asarray(a, jnp.float32)
  return aho.linear_operator(lambda v: unravel(m @ ravel(v)), like)


def test_a_users_dense_operator_works_in_every_algorithm():
  a = _symmetric(8)
  like = {"a": jnp.zeros(3), "b": jnp.zeros(5)}
  op = _dense_operator(a, like)
  eigs = np.linalg.eigvalsh(a)
  np.testing.assert_allclose(aho.eigenpairs(op, 0, k=3).values,
                             eigs[::-1][:3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aho.eigenpairs(op, 0, k=2, which="smallest").values,
                             eigs[:2], rtol=1e-5, atol=1e-5)
  # Hutch++ whose sketch spans the whole space is exact.
  exact = aho.trace(op, 0, n_samples=30, method="hutch++")
  np.testing.assert_allclose(exact.estimate, np.trace(a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(exact.per_leaf["a"], np.trace(a[:3, :3]),
                             rtol=1e-4, atol=1e-5)
  # Hutchinson: within 4 standard errors, each sample z^T A z.
  est = aho.trace(op, 1, n_samples=400)
  assert abs(float(est.estimate) - np.trace(a)) < 4 * float(est.stderr)
  # Lanczos quadrature with n_steps = size: nodes are the eigenvalues, and
  # n sum_k w_k theta_k is the Hutchinson sample of the same probe.
  esd = aho.spectral_density(op, 1, n_samples=3, n_steps=8)
  np.testing.assert_allclose(np.sort(esd.nodes[0]), eigs, atol=1e-4)
  np.testing.assert_allclose(8 * np.sum(esd.weights * esd.nodes, axis=1),
                             aho.trace(op, 1, n_samples=3).samples, rtol=1e-4,
                             atol=1e-4)
  summary = aho.per_layer(op, 0, n_samples=400, n_steps=5)
  np.testing.assert_allclose(summary.top_eigenvalue["b"],
                             np.linalg.eigvalsh(a[3:, 3:])[-1], rtol=1e-4)
  assert summary.size == {"a": 3, "b": 5}
  # Restricted and preconditioned, the user's operator too.
  block = op.restrict({"a": True, "b": False})
  np.testing.assert_allclose(aho.eigenpairs(block, 0, k=3).values,
                             np.linalg.eigvalsh(a[:3, :3])[::-1], rtol=1e-5,
                             atol=1e-5)
  p = np.linspace(0.5, 4.0, 8)
  pre = op.precondition({"a": jnp.asarray(p[:3], jnp.float32),
                         "b": jnp.asarray(p[3:], jnp.float32)})
  scaled = a / np.sqrt(np.outer(p, p))
  np.testing.assert_allclose(aho.eigenpairs(pre, 0).values,
                             np.linalg.eigvalsh(scaled)[-1:], rtol=1e-5)
  # An operator is a pytree: passed into jit, it runs there.
  top = jax.jit(lambda o: aho.eigenpairs(o, 0).values)(op)
  np.testing.assert_allclose(top, eigs[-1:], rtol=1e-5)


def test_a_fisher_written_as_a_pytree_matvec_is_the_librarys():
  params, x, y, exact = _reference()

  def fisher_matvec(v):  # the user's own: J^T J v / N on pytrees
    losses = lambda p: _per_example(p, x, y)
    _, jv = jax.jvp(losses, (params,), (v,))
    return jax.vjp(losses, params)[1](jv / x.shape[0])[0]

  mine = aho.linear_operator(fisher_matvec, params)
  ours = aho.curvature_operator(
      aho.empirical_fisher(lambda p: _per_example(p, x, y)), params)
  np.testing.assert_allclose(aho.eigenpairs(mine, 0, k=2).values,
                             aho.eigenpairs(ours, 0, k=2).values, rtol=1e-4)
  np.testing.assert_allclose(
      aho.eigenpairs(mine, 0, k=2).values,
      np.linalg.eigvalsh(exact["fisher"])[::-1][:2], rtol=1e-4)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["damping"], meta_fields=["loss_fn"])
@dataclasses.dataclass(frozen=True)
class _Damped(aho.Curvature):
  """A new kind, written outside the library: the Hessian plus damping."""

  loss_fn: Any
  damping: Any

  def __call__(self, params, *batch):
    return self.loss_fn(params, *batch)

  def linearize(self, params, space, *batch, axis_name=None):
    value, grad, product = aho.Hessian(self.loss_fn).linearize(
        params, space, *batch, axis_name=axis_name)
    return value, grad, jax.tree_util.Partial(_damped_product, product,
                                              self.damping)


def _damped_product(product, damping, v):
  return [h + damping * x for h, x in zip(product(v), v)]


def test_a_new_kind_plugs_into_the_operator_and_every_algorithm():
  params, x, y, exact = _reference()
  kind = _Damped(lambda p: _loss(p, (x, y)), jnp.float32(0.5))
  damped = exact["hessian"] + 0.5 * np.eye(exact["hessian"].shape[0])
  np.testing.assert_allclose(
      aho.hessian_eigenvalues(kind, params, 0, k=2).values,
      np.linalg.eigvalsh(damped)[::-1][:2], rtol=1e-4)
  np.testing.assert_allclose(
      aho.hessian_trace(kind, params, 0, n_samples=99, method="hutch++").estimate,
      np.trace(damped), rtol=0.05)
  d = jax.tree.map(jnp.ones_like, params)
  np.testing.assert_allclose(
      aho.loss_landscape(kind, params, [d], jnp.zeros(1)),
      [_loss(params, (x, y))], rtol=1e-6)


def _count_compiles():
  counts = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: counts.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  return counts


def test_programs_are_reused_for_new_params_and_batches():
  params, x, y, _ = _reference()
  counts = _count_compiles()

  def analyse(p, batch):
    op = aho.curvature_operator(_loss, p, batch=batch)
    return (aho.eigenpairs(op, 0, k=2).values,
            aho.trace(op, 0, n_samples=5).estimate)

  moved = jax.tree.map(lambda a: a * 1.1, params)
  other = (x[::-1], y[::-1])
  analyse(params, (x, y))
  warm = len(counts)
  assert warm > 0
  values, _ = analyse(moved, other)
  assert len(counts) == warm  # nothing compiled again
  flat, unravel = ravel_pytree(moved)
  hess = jax.hessian(lambda f: _loss(unravel(f), (x, y)))(flat)
  np.testing.assert_allclose(values, np.linalg.eigvalsh(
      np.asarray(hess, np.float64))[::-1][:2], rtol=1e-4)


def test_operator_built_inside_jit_equals_the_one_built_outside():
  params, x, y, _ = _reference()
  outside = aho.curvature_operator(_loss, params, batch=(x, y))
  inside = jax.jit(lambda p: aho.eigenpairs(
      aho.curvature_operator(_loss, p, batch=(x, y)), 0, k=2).values)(params)
  np.testing.assert_allclose(aho.eigenpairs(outside, 0, k=2).values, inside,
                             rtol=1e-4)
  assert outside.space.placement is None
  assert len(_programs._CACHE) <= _programs.SIZE  # pylint: disable=protected-access


def test_a_ggn_of_a_loss_linear_in_the_outputs_is_refused():
  params, x, y, _ = _reference()
  # Equinox's MNIST example: output_fn returns log-probabilities and the
  # loss picks them: linear in the outputs, so the GGN would be zero.
  log_probs = lambda p: jax.nn.log_softmax(_logits(p, x))
  picked = lambda lp: -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=1))
  with pytest.raises(ValueError, match="no curvature in the outputs"):
    aho.hessian_eigenvalues(aho.ggn(log_probs, picked), params, 0)
  with pytest.raises(ValueError, match="no curvature in the outputs"):
    jax.jit(lambda p: aho.hessian_trace(aho.ggn(log_probs, picked), p, 0))(
        params)


def test_bad_operator_inputs_are_named():
  params, x, y, _ = _reference()
  with pytest.raises(TypeError, match="takes a LinearOperator"):
    aho.eigenpairs(lambda p: _loss(p, (x, y)), 0)
  with pytest.raises(TypeError, match="matvec must be a callable"):
    aho.linear_operator(None, params)
  with pytest.raises(ValueError, match="no floating-point leaf"):
    aho.linear_operator(lambda v: v, {"n": jnp.int32(1)})
  with pytest.raises(TypeError, match="losses_fn must be a callable"):
    aho.empirical_fisher(1.0)
  with pytest.raises(ValueError, match="method must be one of"):
    aho.finite_difference(jnp.sum, method="backward")
  with pytest.raises(ValueError, match="step must be a number"):
    aho.finite_difference(jnp.sum, step=2.0)
  op = aho.curvature_operator(lambda p: _loss(p, (x, y)), params)
  with pytest.raises(ValueError, match="per_layer needs an operator on whole"):
    aho.per_layer(op.restrict({"w1": np.eye(3, 4) > 0, "b1": True,
                               "w2": True}), 0)
  with pytest.raises(ValueError, match="must be positive"):
    op.precondition(jax.tree.map(jnp.zeros_like, params))


@pytest.mark.parametrize("jit", [False, True])
def test_params_sharded_over_a_2d_mesh_give_the_exact_eigenvalues(jit):
  # Leaves sharded over both axes of a 2x2 mesh in different orders (an
  # embedding, a 1-D convolution, attention-like kernels): the products come
  # out sharded otherwise than the probes, and XLA (jax 0.10, CPU)
  # miscompiled the dot of the Lanczos basis with such a vector (top
  # eigenvalue 1.222 for 1.240, reported converged).
  mesh = jax.make_mesh((2, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(5)
  specs = {"emb": P("model", "data"), "conv": P(None, "data", "model"),
           "q": P("data", "model", None), "o": P("data", "model", None),
           "head": P("data", "model"), "bias": P("model")}
  shapes = {"emb": (6, 4), "conv": (3, 4, 4), "q": (4, 2, 2), "o": (2, 2, 4),
            "head": (4, 2), "bias": (4,)}
  params = {k: jax.device_put(
      jnp.asarray(rng.normal(size=shapes[k]) / 2, jnp.float32),
      NamedSharding(mesh, specs[k])) for k in specs}
  tokens = jnp.asarray(rng.integers(0, 6, (8, 5)))

  def loss(p):
    h = jax.lax.conv_general_dilated(p["emb"][tokens], p["conv"], (1,),
                                     "SAME", dimension_numbers=("NWC", "WIO",
                                                                "NWC"))
    q = jnp.einsum("btd,dhk->bthk", jnp.tanh(h + p["bias"]), p["q"])
    a = jnp.tanh(jnp.einsum("bthk,hkd->btd", q, p["o"]))
    return jnp.mean(jnp.tanh(a.mean(1) @ p["head"]) ** 2)

  flat, unravel = ravel_pytree(params)
  exact = np.linalg.eigvalsh(np.asarray(
      jax.hessian(lambda f: loss(unravel(f)))(np.asarray(flat)), np.float64))
  fn = lambda p: aho.hessian_eigenvalues(loss, p, 0, k=3).values
  got = (jax.jit(fn) if jit else fn)(params)
  np.testing.assert_allclose(got, exact[::-1][:3], rtol=1e-4, atol=1e-6)


def test_wrt_as_a_plain_dict_selects_a_block_of_an_nnx_state():
  # An nnx.State is its own pytree node: a plain dict prefix is matched key
  # by key instead of by container type.
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
  loss = lambda p: jnp.mean(jnp.tanh(nnx.merge(graphdef, p)(x)) ** 2)
  flat, unravel = ravel_pytree(params)
  hess = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)
  # ravel_pytree orders the leaves as jax.tree.leaves: bias (2), kernel (6).
  got = aho.hessian_eigenvalues(loss, params, 0, k=2,
                                wrt={"bias": False, "kernel": True}).values
  np.testing.assert_allclose(got, np.linalg.eigvalsh(hess[2:, 2:])[::-1][:2],
                             rtol=1e-4)
  with pytest.raises(ValueError, match="pytree prefix of params"):
    aho.hessian_eigenvalues(loss, params, 0, wrt={"kernel": True})


def test_spectral_density_default_steps_fit_an_operator_smaller_than_50():
  # The default n_steps is min(50, size): a 4-dimensional operator gets 4
  # steps, and each probe's quadrature reproduces its Hutchinson sample
  # (n * sum_k w_k theta_k = z^T A z for the same probe).
  a = jnp.diag(jnp.array([1.0, 2.0, 2.0, 5.0])) + 0.1
  op = aho.linear_operator(lambda v: a @ v, jnp.zeros(4))
  esd = aho.spectral_density(op, key=3, n_samples=2)
  assert esd.nodes.shape == (2, 4)
  samples = aho.trace(op, key=3, n_samples=2).samples
  np.testing.assert_allclose(4 * np.sum(esd.weights * esd.nodes, axis=1),
                             samples, rtol=1e-5)
  with pytest.raises(ValueError, match=r"n_steps must lie in \[1, 4\]"):
    aho.spectral_density(op, key=3, n_steps=5)
