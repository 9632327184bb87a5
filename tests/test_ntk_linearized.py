"""Linearised predictors vs explicit training of the jvp-linearised model (docs/ntk_theory.md §5: T8, T11)."""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_analysis import kernels, linearized


def mlp(params, x, act=jnp.tanh):
  h = x
  for i, (w, b) in enumerate(params):
    h = h @ w / jnp.sqrt(w.shape[0]) + b
    if i < len(params) - 1:
      h = act(h)
  return h


def init_mlp(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return [(jax.random.normal(k, (a, b)), jnp.zeros(b)) for k, a, b in zip(keys, sizes[:-1],
                                                                          sizes[1:])]


@pytest.fixture()
def problem():
  with jax.enable_x64(True):
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                               init_mlp(jax.random.PRNGKey(0), [4, 16, 3]))
    rng = np.random.RandomState(0)
    x, xt = rng.randn(10, 4), rng.randn(5, 4)
    labels = rng.randint(0, 3, 10)
    yield p, x, xt, labels


def _lin(p0):
  """The jvp-linearised model f_lin(p, x) = f(p0, x) + J(p0, x)(p - p0)."""
  def f(p, x):
    d = jax.tree_util.tree_map(lambda a, b: a - b, p, p0)
    y0, jd = jax.jvp(lambda q: mlp(q, x), (p0,), (d,))
    return y0 + jd
  return f


def _kernels(p, x, xt):
  k = kernels.empirical_ntk(mlp, p, x, dtype=np.float64)
  kx = kernels.empirical_ntk(mlp, p, xt, x, dtype=np.float64)
  return k, kx


def test_t8_gd_mse_closed_form_equals_explicit_linearised_gd(problem):
  p, x, xt, labels = problem
  with jax.enable_x64(True):
    y = np.eye(3)[labels]
    full = kernels.empirical_ntk(mlp, p, x, trace=False, dtype=np.float64)  # (N, N, O, O)
    fullx = kernels.empirical_ntk(mlp, p, xt, x, trace=False, dtype=np.float64)
    k = full.transpose(0, 2, 1, 3).reshape(30, 30)  # outputs share parameters: K is not K⊗I
    kx = fullx.transpose(0, 2, 1, 3).reshape(15, 30)
    eta = 1.0 / np.linalg.eigvalsh(k).max()
    f_lin = _lin(p)
    loss = lambda q: 0.5 * jnp.sum((f_lin(q, x) - y) ** 2)
    grad = jax.jit(jax.grad(loss))
    q = p
    for _ in range(30):
      q = jax.tree_util.tree_map(lambda a, g: a - eta * g, q, grad(q))
    col = lambda a: np.asarray(a).reshape(-1, 1)
    train, test = linearized.gd_mse(k, kx, col(y), col(mlp(p, x)), col(mlp(p, xt)), eta, 30)
    np.testing.assert_allclose(train.reshape(10, 3), f_lin(q, x), atol=1e-10)
    np.testing.assert_allclose(test.reshape(5, 3), f_lin(q, xt), atol=1e-10)
    with pytest.raises(ValueError, match="diverges"):
      linearized.gd_mse(k, kx, col(y), col(mlp(p, x)), col(mlp(p, xt)),
                        2.5 / np.linalg.eigvalsh(k).max(), 3)


def test_t8_kernel_ridge_equals_weight_space_ridge(problem):
  p, x, xt, labels = problem
  with jax.enable_x64(True):
    y = np.eye(3)[labels]
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    jac = lambda xx: np.asarray(jax.jacrev(lambda v: mlp(unravel(v), xx))(flat))  # (N, O, P)
    j, jt = jac(x), jac(xt)
    lam = 0.3
    # weight space: min ||J d - (Y - f0)||^2 + lam ||d||^2 over all outputs jointly
    a = j.reshape(-1, flat.size)
    r = (y - mlp(p, x)).reshape(-1)
    d = np.linalg.solve(a.T @ a + lam * np.eye(flat.size), a.T @ r)
    expect = np.asarray(mlp(p, xt)) + (jt.reshape(-1, flat.size) @ d).reshape(len(xt), 3)
    kf = np.einsum("aop,bqp->aobq", j, j).reshape(30, 30)
    kxf = np.einsum("aop,bqp->aobq", jt, j).reshape(15, 30)
    got = linearized.kernel_ridge(kf, kxf, r[:, None], lam=lam).reshape(len(xt), 3)
    np.testing.assert_allclose(got + np.asarray(mlp(p, xt)), expect, atol=1e-10)


def test_t8_function_space_ce_equals_linearised_ce_gd(problem):
  p, x, xt, labels = problem
  with jax.enable_x64(True):
    full = kernels.empirical_ntk(mlp, p, x, trace=False, dtype=np.float64)
    fullx = kernels.empirical_ntk(mlp, p, xt, x, trace=False, dtype=np.float64)
    # this MLP's last layer is linear and shared: K_oq is (nearly) diagonal but not exactly, so
    # use the full (N O x N O) kernel in function space
    f_lin = _lin(p)
    y = np.eye(3)[labels]
    loss = lambda q: -jnp.sum(y * jax.nn.log_softmax(f_lin(q, x)))
    grad = jax.jit(jax.grad(loss))
    q, eta = p, 0.05
    for _ in range(20):
      q = jax.tree_util.tree_map(lambda a, g: a - eta * g, q, grad(q))
    ft, fx = np.asarray(mlp(p, x)), np.asarray(mlp(p, xt))
    for _ in range(20):
      gr = linearized.softmax(ft) - y
      ft = ft - eta * np.einsum("aboq,bq->ao", full, gr)
      fx = fx - eta * np.einsum("aboq,bq->ao", fullx, gr)
    np.testing.assert_allclose(ft, f_lin(q, x), atol=1e-10)
    np.testing.assert_allclose(fx, f_lin(q, xt), atol=1e-10)


def test_function_space_gd_helper_matches_block_diagonal_case():
  """With K_full = K ⊗ I (a linear model), function_space_gd(traced K) is exact."""
  rng = np.random.RandomState(0)
  x, xt = rng.randn(8, 5), rng.randn(3, 5)
  labels = rng.randint(0, 4, 8)
  w = np.zeros((5, 4))
  y = np.eye(4)[labels]
  eta = 0.1
  for _ in range(15):
    z = x @ w
    w = w - eta * x.T @ (linearized.softmax(z) - y)
  ft, fx = linearized.function_space_gd(x @ x.T, xt @ x.T, np.zeros((8, 4)), np.zeros((3, 4)),
                                        labels, eta, 15)
  np.testing.assert_allclose(ft, x @ w, atol=1e-12)
  np.testing.assert_allclose(fx, xt @ w, atol=1e-12)


def test_function_space_sgd_equals_torch_sgd_with_momentum_on_the_linearised_model(problem):
  """Two heads of 3 logits (the mean CE of each, summed), a cosine learning-rate list and
  momentum 0.9: weight-space SGD on the jvp-linearised MLP, b <- m b + g, p <- p - lr b, gives
  the same train and held-out outputs as function_space_sgd with the full eNTK at p0."""
  p, x, xt, labels = problem
  with jax.enable_x64(True):
    p = jax.tree_util.tree_map(jnp.asarray, p)
    p = p[:-1] + [(jax.random.normal(jax.random.PRNGKey(1), (16, 6), jnp.float64),
                   jnp.zeros(6, jnp.float64))]  # 6 outputs = 2 heads x 3 classes
    xa = np.concatenate([x, xt])
    f_lin = _lin(p)
    y = np.eye(3)[labels]

    def loss(q):
      z = f_lin(q, x).reshape(len(x), 2, 3)
      return -jnp.sum(y[:, None, :] * jax.nn.log_softmax(z)) / len(x)
    grad = jax.jit(jax.grad(loss))
    lrs = [0.3 * (1 + np.cos(np.pi * e / 3)) / 2 for e in range(3) for _ in range(4)]
    q, buf = p, jax.tree_util.tree_map(jnp.zeros_like, p)
    for lr in lrs:
      buf = jax.tree_util.tree_map(lambda b, g: 0.9 * b + g, buf, grad(q))
      q = jax.tree_util.tree_map(lambda a, b: a - lr * b, q, buf)
    k = kernels.empirical_ntk(mlp, p, xa, trace=False, dtype=np.float64)  # (N, N, 6, 6)
    got = linearized.function_space_sgd(k, np.asarray(mlp(p, xa)), np.arange(len(x)), labels,
                                        lrs, 0.9, heads=2)
    np.testing.assert_allclose(got, f_lin(q, xa), atol=1e-10)
    assert np.abs(got - np.asarray(mlp(p, xa))).max() > 0.1  # the outputs did move
    with pytest.raises(ValueError, match="heads"):
      linearized.function_space_sgd(k, np.asarray(mlp(p, xa)), np.arange(len(x)), labels, lrs,
                                    heads=4)


def test_continuous_gd_is_the_small_step_limit_of_discrete_gd():
  rng = np.random.RandomState(1)
  a = rng.randn(6, 6)
  k = a @ a.T
  kx = rng.randn(2, 6)
  y, f0, f0t = rng.randn(6, 2), rng.randn(6, 2), rng.randn(2, 2)
  steps, t = 20000, 3.0
  eta_d = t / steps / y.size  # discrete step on the sum loss = continuous rate / |Y|
  tr_d, te_d = linearized.gd_mse(k, kx, y, f0, f0t, eta_d, steps)
  tr_c, te_c = linearized.gd_mse_continuous(k, kx, y, f0, f0t, 1.0, t)
  np.testing.assert_allclose(tr_c, tr_d, atol=1e-4)
  np.testing.assert_allclose(te_c, te_d, atol=1e-4)
  # one output given as a vector: the same as the (N, 1) column
  tr_1, te_1 = linearized.gd_mse_continuous(k, kx, y[:, 0], f0[:, 0], f0t[:, 0], 1.0, t)
  tr_col, te_col = linearized.gd_mse_continuous(k, kx, y[:, :1], f0[:, :1], f0t[:, :1], 1.0, t)
  np.testing.assert_allclose(tr_1, tr_col[:, 0], atol=1e-12)
  np.testing.assert_allclose(te_1, te_col[:, 0], atol=1e-12)


def test_recursive_cl_ridge_with_orthogonal_tasks_never_forgets():
  """Block-diagonal joint kernel (orthogonal tasks): learning task 2 leaves task 1's outputs
  unchanged, so A_hat[1, 0] = A_hat[0, 0]; with an overlapping kernel it need not."""
  rng = np.random.RandomState(0)
  n = 6
  feats = [rng.randn(2 * n, 8) for _ in range(2)]
  k = np.zeros((4 * n, 4 * n))
  k[:2 * n, :2 * n] = feats[0] @ feats[0].T
  k[2 * n:, 2 * n:] = feats[1] @ feats[1].T
  labels = np.concatenate([rng.randint(0, 2, 2 * n), rng.randint(2, 4, 2 * n)])
  y = np.eye(4)[labels]
  train = [np.arange(0, n), np.arange(2 * n, 3 * n)]
  test = [np.arange(n, 2 * n), np.arange(3 * n, 4 * n)]
  acc = linearized.recursive_cl([k, k], train, test, y, np.zeros_like(y), lam=1e-3)
  assert acc[1, 0] == acc[0, 0]
  # the same helper equals a hand-rolled ridge chain on a dense kernel
  kd = np.vstack(feats) @ np.vstack(feats).T
  acc_d = linearized.recursive_cl([kd, kd], train, test, y, np.zeros_like(y), lam=1e-3)
  f = np.zeros_like(y)
  for tr in train:
    f = f + kd[:, tr] @ np.linalg.solve(kd[np.ix_(tr, tr)] + 1e-3 * np.eye(n), y[tr] - f[tr])
  assert acc_d[1, 0] == linearized.accuracy(f[test[0]], labels[test[0]])


@pytest.mark.slow
def test_t11_wider_mlps_stay_closer_to_their_linearisation():
  rng = np.random.RandomState(0)
  x, xt = rng.randn(16, 4).astype(np.float32), rng.randn(8, 4).astype(np.float32)
  y = np.sin(x[:, :1] * 2)
  gaps = {}
  for width in (64, 1024):
    p0 = init_mlp(jax.random.PRNGKey(1), [4, width, width, 1])
    f_lin = _lin(p0)
    def train(f):
      loss = lambda q: 0.5 * jnp.mean((f(q, x) - y) ** 2)
      grad = jax.jit(jax.grad(loss))
      q = p0
      for _ in range(100):
        q = jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, q, grad(q))
      return np.asarray(f(q, xt))
    net, lin = train(mlp), train(f_lin)
    gaps[width] = np.linalg.norm(net - lin) / np.linalg.norm(lin - np.asarray(mlp(p0, xt)))
  print("relative net-vs-linearised test-output gap:", gaps)
  assert gaps[1024] < gaps[64], gaps
