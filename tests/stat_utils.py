"""Statistical checks that a decoding method samples exactly the AR distribution.

On a small random model (vocab 8) the exact distribution of the first three generated tokens
is computed by enumeration; a method's samples (many rows of one prompt, in one generate
call per chunk) are compared with it by a chi-square goodness-of-fit test (cells with a small
expected count are pooled)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import chisquare

import jaxspec
from conftest import jit_forward, make_tiny_bundle
from jaxspec.models.kv_cache import init_cache
from jaxspec.sampling import SamplingConfig, target_logprobs

VOCAB = 8
N_TOKENS = 3


def peaky_tiny_bundle(seed=0):
  """A random model whose next-token distributions are far from uniform (vocab 8), no EOS."""
  b = make_tiny_bundle(seed=seed, vocab=VOCAB, layers=2, eos=())
  b.tokenizer.eos_token_id = None
  b.params["embed_VxE"].set_value(b.params["embed_VxE"][...] * 40.0)
  b.params["lm_head_ExV"].set_value(b.params["lm_head_ExV"][...] * 40.0)
  return b


def exact_distribution(bundle, prompt, sampling: SamplingConfig, n_tokens=N_TOKENS):
  """P(t1..tn) over all VOCAB**n continuations, by enumeration: array [V]*n."""
  fwd = jit_forward(bundle)
  V = VOCAB
  conts = np.array(list(itertools.product(range(V), repeat=n_tokens - 1)), np.int32)  # all prefixes to score
  L = len(prompt) + n_tokens - 1
  seqs = np.concatenate([np.tile(np.asarray(prompt, np.int32), (len(conts), 1)), conts], axis=1)
  cache = init_cache(bundle.config, len(seqs), L + 1)
  lg, _, _ = fwd(cache, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(L), (len(seqs), L)),
                 jnp.tril(jnp.ones((L, L), bool)))
  logp = np.asarray(target_logprobs(lg[:, len(prompt) - 1:], sampling), np.float64)  # [N, n, V]
  P = np.zeros((V,) * n_tokens)
  for idx in itertools.product(range(V), repeat=n_tokens):
    row = int(np.ravel_multi_index(idx[:-1], (V,) * (n_tokens - 1))) if n_tokens > 1 else 0
    lp = sum(logp[row, j, idx[j]] for j in range(n_tokens))
    P[idx] = np.exp(lp)
  return P / P.sum()


def sample_counts(bundle, prompt, sampling: SamplingConfig, method="ar", method_options=None, rows=4000,
                  chunks=3, n_tokens=N_TOKENS):
  counts = np.zeros((VOCAB,) * n_tokens)
  for c in range(chunks):
    out = jaxspec.generate(bundle, [prompt] * rows, method=method, method_options=method_options,
                           max_new_tokens=n_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                           top_p=sampling.top_p, seed=1000 + c)
    for ids in out.token_ids:
      assert len(ids) == n_tokens
      counts[tuple(ids)] += 1
  return counts


def gof_pvalue(counts, P, min_expected=5.0):
  n = counts.sum()
  e = (P * n).ravel()
  o = counts.ravel()
  small = e < min_expected
  e2 = np.append(e[~small], e[small].sum())
  o2 = np.append(o[~small], o[small].sum())
  if e2[-1] == 0:
    e2, o2 = e2[:-1], o2[:-1]
  return chisquare(o2, e2 / e2.sum() * o2.sum()).pvalue
