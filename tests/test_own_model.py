"""Bring your own model: a Flax NNX module written here, not jaxspec's Decoder, that implements
the forward contract decodes with every registered method, with the same greedy output as its
own AR. The contract (README, models/decoder.py):

    logits, hidden, cache = model(cache, tokens_BxT, positions_BxT, tree_mask_TxT, capture=(),
                                  logits_index_BxN=None, attn_impl="auto", num_layers=None,
                                  start_layer=0, inputs_BxTxE=None, write_cache=True)

(`start_layer`/`inputs_BxTxE`, a partial pass through the upper layers, only hidden_transfer uses;
`write_cache=False` returns the new tokens' K/V in place of the written cache: the decode step.)
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxspec
from conftest import ToyTokenizer, random_heads_folder
from jaxspec.kernels import tree_attention
from jaxspec.models.bundle import ModelBundle
from jaxspec.models.config import ModelConfig
from jaxspec.models.kv_cache import write_scratch

OPTIONS = {"ar": {}, "pld": dict(k=3), "recycling": dict(template="small"), "draft": dict(k=2),
           "jacobi": dict(n=4), "lookahead": dict(W=3, N=3, G=3), "sjd": dict(L=4),
           "hidden_transfer": dict(nodes=6), "auto": {},  # hidden_transfer: + random heads, made per test
           "lud": dict(adapters="none", placeholder=0, k=3, beta=0.05, verify=True)}


class TinyLM(nnx.Module):
  """Learned absolute positions, single-head-group attention layers, no norms: nothing like
  jaxspec's Decoder inside, the same contract outside."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.config = c = config
    E, H, K, D = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    w = lambda *shape: nnx.Param(0.3 * jax.random.normal(rngs.params(), shape))
    self.tok_VxE, self.pos_PxE, self.out_ExV = w(c.vocab_size, E), w(c.max_position_embeddings, E), w(E, c.vocab_size)
    self.layers = nnx.List([nnx.Dict(q=w(E, H * D), k=w(E, K * D), v=w(E, K * D), o=w(H * D, E))
                            for _ in range(c.num_layers)])

  def __call__(self, cache, tokens_BxT, positions_BxT, tree_mask_TxT, capture=(), logits_index_BxN=None,
               attn_impl="auto", num_layers=None, start_layer=0, inputs_BxTxE=None, write_cache=True):
    c = self.config
    B, T = positions_BxT.shape
    x = inputs_BxTxE if inputs_BxTxE is not None else self.tok_VxE[...][tokens_BxT] + self.pos_PxE[...][positions_BxT]
    ks, vs, hidden = list(cache.k), list(cache.v), {}
    new_k, new_v = [None] * c.num_layers, [None] * c.num_layers
    for i, layer in enumerate(self.layers):
      if num_layers is not None and i >= num_layers:
        break
      if i < start_layer:
        continue
      q = (x @ layer["q"][...]).reshape(B, T, c.num_heads, c.head_dim)
      k = (x @ layer["k"][...]).reshape(B, T, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
      v = (x @ layer["v"][...]).reshape(B, T, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
      o = tree_attention(q, ks[i], vs[i], cache.lengths, tree_mask_TxT, k, v, impl=attn_impl)
      ks[i], vs[i] = write_scratch(ks[i], k, cache.lengths), write_scratch(vs[i], v, cache.lengths)
      new_k[i], new_v[i] = k, v
      x = jnp.tanh(x + o.reshape(B, T, -1) @ layer["o"][...])
      if i in {l % c.num_layers for l in capture}:
        hidden[i] = x
    if logits_index_BxN is not None:
      x = jnp.take_along_axis(x, logits_index_BxN[:, :, None], axis=1)
    out = cache.replace(k=tuple(ks), v=tuple(vs)) if write_cache else cache.replace(k=tuple(new_k), v=tuple(new_v))
    return (x @ self.out_ExV[...]).astype(jnp.float32), hidden, out


@pytest.fixture(scope="module")
def own_bundle():
  c = ModelConfig(vocab_size=48, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  eos_token_ids=(), max_position_embeddings=256)
  graphdef, params = nnx.split(TinyLM(c, nnx.Rngs(4)))
  tok = ToyTokenizer()
  tok.eos_token_id = None
  return ModelBundle("tiny-own", None, c, graphdef, params, tok, jnp.dtype(jnp.float32))


PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [3, 4], [10, 11, 12, 13, 10, 11, 12, 13, 10]]


def test_every_method_is_listed():
  assert set(OPTIONS) == set(jaxspec.METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_own_model_decodes_like_its_own_ar(own_bundle, method, tmp_path):
  want = jaxspec.generate(own_bundle, PROMPTS, max_new_tokens=20).token_ids
  assert all(len(r) == 20 for r in want)
  opts = dict(OPTIONS[method])
  if method == "hidden_transfer":
    opts["heads"] = str(random_heads_folder(own_bundle, tmp_path / "heads", k=3, layer=2))
  got = jaxspec.generate(own_bundle, PROMPTS, method=method, method_options=opts, max_new_tokens=20)
  assert got.token_ids == want, method
