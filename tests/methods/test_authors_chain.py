"""The authors' published meta-model (lps_jax.methods.authors_chain): its features equal a line
by line numpy transcription of sup_cifar_chain.forward, are exactly invariant to ResNet-20's
channel symmetry on layers 1-3, and the model learns."""
import jax
import numpy as np

from lps_jax.align.fit import SecondOrderConfig
from lps_jax.methods import authors_chain
from lps_jax.methods import registry as methods
from lps_jax.training import resnet


def _authors_forward_features(oihw: list) -> list:
  """models/meta_model_cnn.py lines 85-100 for one model (batch n = 1), torch ops in numpy."""
  x_list = [w[None] for w in oihw]                     # (1, c_out, c_in, 3, 3)
  n, c_out = x_list[0].shape[:2]
  x_chain = x_list[0].reshape(n, c_out, -1)
  out = []
  for i in range(len(x_list)):
    if i > 0:
      n, c_out, c_in = x_list[i].shape[:3]
      x_chain = np.matmul(x_chain.transpose(0, 2, 1),
                          x_list[i].transpose(0, 2, 1, 3, 4).reshape(n, c_in, -1))
      n, c1, c2 = x_chain.shape
      x_chain = x_chain.reshape(n, c1, -1, 9).transpose(0, 2, 1, 3).reshape(n, c2 // 9, -1)
    out.append(np.matmul(x_chain.transpose(0, 2, 1), x_chain).reshape(n, -1))
  return out


def _kernels(variables, depth=3):
  names = resnet.conv_layer_names()[:depth]
  return [np.stack([np.asarray(resnet.get_kernel(v['params'], n), np.float64)
                    for v in variables]) for n in names]


def test_features_are_the_published_forward_and_exactly_invariant():
  variables = [resnet.init_variables(jax.random.PRNGKey(i)) for i in range(2)]
  ks = _kernels(variables)
  got = authors_chain.chain_grams(ks, (1, 2, 3))
  for m in range(2):
    oihw = [k[m].transpose(3, 2, 0, 1) for k in ks]   # HWIO -> PyTorch's OIHW
    for d, want in enumerate(_authors_forward_features(oihw)):
      np.testing.assert_allclose(got[d][m], want[0], rtol=1e-5, atol=1e-6)
  permuted = [resnet.random_permutation(v, jax.random.PRNGKey(7 + i))
              for i, v in enumerate(variables)]
  again = authors_chain.chain_grams(_kernels(permuted), (1, 2, 3))
  for a, b in zip(got, again):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
  assert not np.allclose(_kernels(permuted)[1], ks[1])   # the weights did move


def test_the_published_model_learns_tasks_from_first_layers():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(4, 3, 3, 3, 16)).astype(np.float32)     # one first layer per task
  task = np.repeat(np.arange(4), 12)
  k = base[task] + 0.3 * rng.normal(size=(48, 3, 3, 3, 16)).astype(np.float32)
  k = np.take_along_axis(k, rng.permuted(np.tile(np.arange(16), (48, 1)), axis=1)
                         [:, None, None, None, :], axis=4)          # any filter order
  est = methods.get('authors_chain').estimator(SecondOrderConfig(), 4)
  train = np.arange(48) % 3 != 0
  est.fit([k[train]], task[train])
  assert (est.predict([k[~train]]).argmax(1) == task[~train]).mean() >= 0.75   # chance 0.25
  emb = est.embed([k[~train]])
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
