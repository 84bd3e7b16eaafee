"""Sampling exactness checks shared by the method tests: on a small random model with peaked
next-token distributions, the exact distribution of the first generated tokens by enumeration,
compared with a method's samples (thousands of rows of one prompt per generate call) by a
chi-square test."""

import itertools

import jax.numpy as jnp
import numpy as np
from scipy.stats import chisquare

import jaxspec
from conftest import jit_forward, make_tiny_bundle
from jaxspec.models.kv_cache import init_cache
from jaxspec.sampling import SamplingConfig, target_logprobs

# --- sampling exactness on a small random model ---------------------------------------------

VOCAB = 16
N_TOKENS = 3


def peaked_tiny_bundle(seed=0, vocab=VOCAB, scale=30.0):
  """A random small model (no EOS) whose next-token distributions are far from uniform."""
  b = make_tiny_bundle(seed=seed, vocab=vocab, layers=2, eos=())
  b.tokenizer.eos_token_id = None
  b.params["embed_VxE"].set_value(b.params["embed_VxE"][...] * scale)
  b.params["lm_head_ExV"].set_value(b.params["lm_head_ExV"][...] * scale)
  return b


def exact_distribution(bundle, prompt, sampling: SamplingConfig, n_tokens=N_TOKENS):
  """P[t1, ..., tn] of the first n generated tokens, by enumeration."""
  V = bundle.config.vocab_size
  fwd = jit_forward(bundle)
  prefixes = np.array(list(itertools.product(range(V), repeat=n_tokens - 1)), np.int32).reshape(-1, n_tokens - 1)
  L = len(prompt) + n_tokens - 1
  seqs = np.concatenate([np.tile(np.asarray(prompt, np.int32), (len(prefixes), 1)), prefixes], axis=1)
  lg, _, _ = fwd(init_cache(bundle.config, len(seqs), L), jnp.asarray(seqs),
                 jnp.broadcast_to(jnp.arange(L), (len(seqs), L)), jnp.tril(jnp.ones((L, L), bool)))
  logp = np.asarray(target_logprobs(lg[:, len(prompt) - 1:], sampling), np.float64)  # [prefixes, n, V]
  P = np.zeros((V,) * n_tokens)
  for row, pre in enumerate(prefixes):
    lp = sum(logp[row, j, pre[j]] for j in range(n_tokens - 1))
    P[tuple(pre)] = np.exp(lp + logp[row, n_tokens - 1])
  return P / P.sum()


def sample_counts(bundle, prompt, sampling: SamplingConfig, method, options=None, rows=4000, chunks=3,
                  n_tokens=N_TOKENS, max_new=None):
  """Counts of the first n_tokens generated tokens over rows*chunks samples (fixed seeds)."""
  V = bundle.config.vocab_size
  counts = np.zeros((V,) * n_tokens)
  for c in range(chunks):
    out = jaxspec.generate(bundle, [prompt] * rows, method=method, method_options=options,
                           max_new_tokens=max_new or n_tokens, temperature=sampling.temperature,
                           top_k=sampling.top_k, top_p=sampling.top_p, seed=1000 + c)
    for ids in out.token_ids:
      counts[tuple(ids[:n_tokens])] += 1
  return counts, out.stats


def gof_pvalue(counts, P, min_expected=5.0):
  """Chi-square goodness of fit; cells expecting fewer than min_expected samples are pooled."""
  e, o = (P * counts.sum()).ravel(), counts.ravel()
  small = e < min_expected
  e2, o2 = np.append(e[~small], e[small].sum()), np.append(o[~small], o[small].sum())
  if e2[-1] == 0:
    assert o2[-1] == 0, "samples where the target has probability 0"
    e2, o2 = e2[:-1], o2[:-1]
  return chisquare(o2, e2 / e2.sum() * o2.sum()).pvalue


# --- a model fine-tuned for LUD (its placeholders predict its units) ------------------------

def _lud_rows(bundle, n=48, new=24, seed=0):
  """Distill-like rows: random prompts and the model's own sampled continuations."""
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(2, bundle.config.vocab_size, size=int(rng.integers(3, 8)))) for _ in range(n)]
  out = jaxspec.generate(bundle, prompts, max_new_tokens=new, temperature=1.0, seed=seed).token_ids
  return [{"question_id": f"q{i}", "category": "toy", "prompt_ids": [int(t) for t in p], "output_ids": o}
          for i, (p, o) in enumerate(zip(prompts, out))]


def lud_tuned_bundle(bundle, workdir, steps=200):
  """(bundle fine-tuned for LUD in full mode, placeholder id 0, k 3; its rows; log; meta)."""
  import dataclasses
  import jax
  from jaxspec.train import TrainConfig, lora
  from jaxspec.train.lud import LudConfig, canonical, train_lud
  rows = _lud_rows(bundle)
  cfg = LudConfig(k=3, alpha=0.6, mode="full", window=32, budget=24, placeholder_id=0)
  tcfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, warmup_steps=10, eval_every=100, save_every=100, log_every=10)
  flat, log, meta = train_lud(bundle, rows, cfg, tcfg, workdir, progress=False)
  graphdef, params = canonical(bundle)
  names, _, treedef = lora.named_leaves(params)
  tuned = dataclasses.replace(bundle, graphdef=graphdef, method_memory={},
                              params=jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names]))
  return tuned, rows, log, meta
