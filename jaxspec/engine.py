"""The decode engine: state init, prefill, and the on-device loop over a method's step.

Everything here is a pure function of (params, state); `graphdef`, the method, the sampling
config and the EOS ids are static. `run_steps` is one `jax.lax.while_loop`: no host round trip
per step. The same compiled `run_steps` drives streaming (one step per call).
"""

from __future__ import annotations

import collections
import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.decode_state import DecodeState, append_tokens
from jaxspec.errors import PromptTooLongError
from jaxspec.methods.speculative import speculative_step
from jaxspec.models.kv_cache import advance, init_cache
from jaxspec.sampling import SamplingConfig, sample_tokens
from jaxspec.sharding import Layout, attention_impl, pin_state

PROMPT_BUCKET = 32  # prompts are padded to a multiple of this: fewer recompiles
CACHE_BUCKET = 256  # cache slots are a multiple of this: kernel-block friendly, fewer recompiles


def _round_up(x: int, m: int) -> int:
  return int(math.ceil(x / m) * m)


def plan_sizes(prompt_lens: Sequence[int], max_new_tokens: int, method, max_positions: int,
               cache_len: int | None = None) -> tuple[int, int, int]:
  """(padded prompt length P, cache slots S, decode step budget). Raises PromptTooLongError."""
  longest = max(prompt_lens)
  need = longest + max_new_tokens + method.scratch_tokens
  if longest + max_new_tokens > max_positions:
    raise PromptTooLongError(
        f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
        f"{max_positions} positions; shorten the prompt or lower max_new_tokens")
  P = _round_up(longest, PROMPT_BUCKET)
  S = _round_up(max(need, P), CACHE_BUCKET)
  if cache_len is not None:
    if need > cache_len:
      raise PromptTooLongError(
          f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) + {method.scratch_tokens} "
          f"scratch slots do not fit cache_len={cache_len}; raise cache_len or shorten the prompt")
    S = max(cache_len, P)
  return P, S, max(max_new_tokens - 1, 0)


def init_state(config, prompts: Sequence[Sequence[int]], max_new_tokens: int, method, key,
               num_slots: int, max_steps: int, cache_dtype, mparams=None) -> DecodeState:
  """Host-side construction of the initial state (before prefill)."""
  B = len(prompts)
  N = num_slots + method.max_commit + 1  # tied to the cache size: one loop compilation per cache bucket
  tokens = np.zeros((B, N), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, : len(p)] = p
  lens = np.array([len(p) for p in prompts], np.int32)
  return DecodeState(
      tokens=jnp.asarray(tokens),
      num_tokens=jnp.asarray(lens),
      prompt_lens=jnp.asarray(lens),
      max_new=jnp.full((B,), max_new_tokens, jnp.int32),
      cache=init_cache(config, B, num_slots, cache_dtype),
      key=key,
      done=jnp.asarray(np.full((B,), max_new_tokens <= 0)),
      step=jnp.zeros((), jnp.int32),
      max_steps=jnp.asarray(max_steps, jnp.int32),
      forwards=jnp.ones((B,), jnp.int32),  # the prefill
      forward_tokens=jnp.zeros((), jnp.int32),
      accept_hist=jnp.zeros((method.max_commit + 1,), jnp.int32),
      method_state=method.init_method_state(config, B, num_slots, cache_dtype, mparams),
  )


def prefill(params, state: DecodeState, mparams=None, *, graphdef, prompt_len: int, sampling: SamplingConfig,
            eos_ids: tuple[int, ...], attn_impl: str = "auto", method=None,
            layout: Layout | None = None) -> DecodeState:
  """Run the padded prompts [B, P] through the model, commit each row's prompt K/V and sample
  the first new token from the logits at its last prompt position. `method` (one with
  `has_prefill`, else None: one compiled prefill serves them all) then reads the prompt too;
  `mparams` are its own parameters. `layout` (None: unsharded) places the attention kernels on
  its mesh and pins the returned state to its shardings."""
  model = nnx.merge(graphdef, params)
  attn_impl = attention_impl(attn_impl, layout)
  B = state.batch_size
  prompt_BxP = state.tokens[:, :prompt_len]
  positions_BxP = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (B, prompt_len))
  causal_PxP = jnp.tril(jnp.ones((prompt_len, prompt_len), bool))
  logits_Bx1xV, hidden, cache = model(state.cache, prompt_BxP, positions_BxP, causal_PxP,
                                      capture=method.capture if method is not None else (),
                                      logits_index_BxN=(state.prompt_lens - 1)[:, None], attn_impl=attn_impl)
  key, sub = jax.random.split(state.key)
  first_B = sample_tokens(logits_Bx1xV[:, 0], sub, sampling)
  state, _ = append_tokens(state.replace(key=key), first_B[:, None], jnp.ones((B,), jnp.int32), eos_ids)
  state = state.replace(cache=advance(cache, state.prompt_lens))
  if method is not None:
    state = state.replace(method_state=method.prefill(model, mparams, state, prompt_len, attn_impl, hidden))
  return pin_state(state, layout, method)


def run_steps(params, state: DecodeState, num_steps: jax.Array, mparams=None, *, graphdef, method, sampling,
              eos_ids, attn_impl: str = "auto", layout: Layout | None = None) -> DecodeState:
  """Up to `num_steps` decode steps of `method` on device (one `speculative_step` each), stopping
  early when every row is done or the state's step budget is spent. `mparams`: the method's own
  parameters (None when it has none). `layout`: as for `prefill`; the loop's carry stays on it."""
  model = nnx.merge(graphdef, params)
  attn_impl = attention_impl(attn_impl, layout)
  limit = jnp.minimum(state.step + num_steps, state.max_steps)

  def cond(s):
    return (s.step < limit) & ~jnp.all(s.done)

  def body(s):
    return pin_state(speculative_step(method, model, mparams, s, sampling, eos_ids, attn_impl), layout, method)

  return jax.lax.while_loop(cond, body, pin_state(state, layout, method))


# XLA CPU's copy insertion, by default, copies every layer's K and V cache in the loop body
# rather than prove that the forward's in-place cache write may follow the attention's read;
# its region analysis proves it (measured: experiments/LOG.md, session 9). Other backends
# ignore this option.
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}

prefill_jit = jax.jit(prefill, static_argnames=("graphdef", "prompt_len", "sampling", "eos_ids", "attn_impl",
                                                "method", "layout"),
                      donate_argnames=("state",), compiler_options=COMPILER_OPTIONS)
run_steps_jit = jax.jit(run_steps, static_argnames=("graphdef", "method", "sampling", "eos_ids", "attn_impl",
                                                    "layout"),
                        donate_argnames=("state",), compiler_options=COMPILER_OPTIONS)


class CompiledCache:
  """Ahead-of-time compiled executables keyed by static args and argument shapes/shardings.

  Lets callers time compilation separately from execution, and reuse executables across calls.
  Holds at most `max_entries`, dropping the least recently used: a decode loop of a 30-layer
  model is ~100 MB of host memory on CPU (experiments/LOG.md, session 14), and a long session
  that tries many methods would otherwise keep them all. A dropped one recompiles on its next
  use (seconds with the persistent XLA cache). `clear()` drops them all.
  """

  def __init__(self, max_entries: int = 32):
    self.max_entries = max_entries
    self._store: collections.OrderedDict[Any, Any] = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._store)

  def clear(self) -> None:
    self._store.clear()

  def get(self, jitted, args: tuple, static: dict) -> tuple[Any, float]:
    """(compiled executable, seconds spent compiling now: 0.0 when reused)."""
    sig = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x), getattr(x, "sharding", None)), args)
    key = (id(jitted), tuple(sorted(static.items())), str(jax.tree.structure(args)), str(sig))
    if key in self._store:
      self._store.move_to_end(key)
      return self._store[key], 0.0
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **static).compile()
    self._store[key] = compiled
    while len(self._store) > self.max_entries:
      self._store.popitem(last=False)
    return compiled, time.perf_counter() - t0


COMPILED = CompiledCache()
