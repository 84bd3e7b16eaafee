"""High-level API: `generate` (batched, on-device loop) and `stream` (yields text as produced)."""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import engine, sharding
from jaxspec.errors import InvalidOptionError
from jaxspec.methods import get_method
from jaxspec.models.bundle import ModelBundle
from jaxspec.sampling import SamplingConfig

STOP_CHECK_STEPS = 16  # with stop strings, the loop returns to the host this often to check them


@dataclasses.dataclass
class GenerateStats:
  """Per-call statistics. Times exclude compilation, which is reported separately."""

  method: str
  new_tokens: list[int]  # per row
  forwards: list[int]  # target forwards per row (prefill included)
  steps: int  # decode steps run (the loop's iterations)
  wall_s: float  # prefill + decode, compile excluded
  prefill_s: float
  compile_s: float
  accept_hist: list[int]  # histogram of tokens committed per active step (index = tokens)

  @property
  def accept_rates(self) -> list[float]:
    """Per draft position k (1-based at index k-1): fraction of active steps that accepted >= k drafts."""
    h = self.accept_hist
    total = sum(h)
    return [sum(h[k + 1:]) / total if total else 0.0 for k in range(1, len(h) - 1)]

  @property
  def tokens_per_forward(self) -> float:
    """MAT: committed tokens / target forwards (bonus included); 1.0 for AR."""
    return sum(self.new_tokens) / max(sum(self.forwards), 1)

  @property
  def tokens_per_s(self) -> float:
    return sum(self.new_tokens) / self.wall_s if self.wall_s > 0 else float("nan")

  def summary(self) -> str:
    return (f"[{self.method}] {sum(self.new_tokens)} tokens in {self.wall_s:.2f}s "
            f"({self.tokens_per_s:.1f} tok/s), {self.steps} steps, "
            f"{self.tokens_per_forward:.2f} tokens/forward, compile {self.compile_s:.1f}s")


@dataclasses.dataclass
class GenerateResult:
  texts: list[str]
  token_ids: list[list[int]]  # new tokens per row (EOS excluded)
  stats: GenerateStats


def encode_prompts(bundle: ModelBundle, prompts, chat: bool | None = None) -> list[list[int]]:
  """Strings -> token ids (through the chat template when the model has one and chat is not
  False); lists of ints pass through unchanged."""
  if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
    prompts = [prompts]
  if not prompts:
    raise InvalidOptionError("no prompts given; pass a string, a list of strings or token id lists")
  tok = bundle.tokenizer
  use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
  out = []
  for p in prompts:
    if isinstance(p, str):
      if use_chat:
        if not getattr(tok, "chat_template", None):
          raise InvalidOptionError(f"{bundle.name} has no chat template; pass chat=False (--no-chat)")
        p = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
      ids = tok.encode(p, add_special_tokens=not use_chat)
    else:
      ids = [int(t) for t in p]
      if any(t < 0 or t >= bundle.config.vocab_size for t in ids):
        raise InvalidOptionError(f"token ids must be in [0, {bundle.config.vocab_size})")
    if not ids:
      raise InvalidOptionError("a prompt encodes to zero tokens; give at least one token")
    out.append(list(ids))
  return out


def _row_outputs(state, eos_ids) -> list[list[int]]:
  tokens = sharding.to_host(state.tokens)
  nt, pl = sharding.to_host(state.num_tokens), sharding.to_host(state.prompt_lens)
  rows = []
  for b in range(tokens.shape[0]):
    ids = tokens[b, pl[b]:nt[b]].tolist()
    if ids and ids[-1] in eos_ids:
      ids = ids[:-1]
    rows.append(ids)
  return rows


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  cuts = [text.find(s) for s in stop if s and s in text]
  return (text[: min(cuts)], True) if cuts else (text, False)


def _prepare(bundle, prompts, method, max_new_tokens, temperature, top_k, top_p, seed, chat,
             cache_len, method_options, mesh=None, rules=None):
  if max_new_tokens < 1:
    raise InvalidOptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
  m = get_method(method, **(method_options or {})) if isinstance(method, str) else method
  if hasattr(m, "resolve"):
    m = m.resolve(bundle)
  ids = encode_prompts(bundle, prompts, chat)
  P, S, max_steps = engine.plan_sizes([len(p) for p in ids], max_new_tokens, m,
                                      bundle.config.max_position_embeddings, cache_len)
  key = jax.random.key(seed) if isinstance(seed, int) else seed
  state = sharding.state_initializer(bundle, mesh, rules)(bundle.config, ids, max_new_tokens, m, key, S, max_steps, bundle.dtype)
  memory_key = getattr(m, "memory_key", None)
  if memory_key and memory_key in bundle.method_memory:  # e.g. Token Recycling's adjacency matrix
    state = state.replace(method_state=bundle.method_memory.pop(memory_key))
  return m, sampling, ids, P, state


def _prefill_method(m):
  """The method if its prefill needs it, else None: methods without a prefill hook share one
  compiled prefill."""
  return m if hasattr(m, "prefill_method") else None


def _aux(bundle, m, static):
  """(aux params, static kwargs with aux_graphdef) for methods with an auxiliary draft model."""
  aux = m.aux_bundle(bundle) if hasattr(m, "aux_bundle") else None
  if aux is None:
    return None, static
  return aux.params, dict(static, aux_graphdef=aux.graphdef)


def _finish_method(bundle, m, state):
  """Keep per-bundle method memory; report acceptance to methods that learn from it."""
  memory_key = getattr(m, "memory_key", None)
  if memory_key:
    bundle.method_memory[memory_key] = state.method_state
  if hasattr(m, "observe"):
    committed = sharding.to_host(state.committed)[: int(state.step)]
    active = committed[committed > 0]
    if active.size:
      m.observe(bundle, float(active.mean() - 1.0), int(active.size))


def reset_method_memory(bundle, method: str | None = None) -> None:
  """Forget what methods learned on this bundle (all, or one method's memory key)."""
  if method is None:
    bundle.method_memory.clear()
  else:
    key = getattr(get_method(method), "memory_key", None)
    bundle.method_memory.pop(key, None)


def generate(bundle: ModelBundle, prompts, method="ar", *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed=0,
             stop: Sequence[str] | None = None, chat: bool | None = None, cache_len: int | None = None,
             attn_impl: str = "auto", method_options: dict | None = None, mesh=None,
             rules=None) -> GenerateResult:
  """Generate for a batch of prompts (strings or token-id lists) with `method`.

  Greedy when temperature == 0. Same inputs and seed -> same outputs. Rows stop at EOS,
  at max_new_tokens, or (text is cut there) at the first stop string. `mesh`/`rules`
  (jaxspec.sharding; default: the bundle's) decode sharded over a device mesh.
  """
  m, sampling, ids, P, state = _prepare(bundle, prompts, method, max_new_tokens, temperature, top_k,
                                        top_p, seed, chat, cache_len, method_options, mesh, rules)
  params, state, prefill_jit, run_steps_jit = sharding.decode_fns(bundle, state, mesh, rules, m)
  eos = bundle.eos_ids
  static = dict(sampling=sampling, eos_ids=eos, attn_impl=attn_impl)
  aux_params, static = _aux(bundle, m, static)
  aux_params = sharding.aux_params_for(aux_params, bundle, mesh, rules)
  pre, c1 = engine.COMPILED.get(prefill_jit, (params, state, aux_params),
                                dict(static, graphdef=bundle.graphdef, prompt_len=P, method=_prefill_method(m)))
  chunk = STOP_CHECK_STEPS if stop else state.committed.shape[0]
  steps_arg = jnp.asarray(chunk, jnp.int32)
  t0 = time.perf_counter()
  state = jax.block_until_ready(pre(params, state, aux_params))
  prefill_s = time.perf_counter() - t0
  run, c2 = engine.COMPILED.get(run_steps_jit, (params, state, steps_arg, aux_params),
                                dict(static, graphdef=bundle.graphdef, method=m))
  t1 = time.perf_counter()
  stopped = [False] * len(ids)
  while True:
    state = run(params, state, steps_arg, aux_params)
    done = sharding.to_host(state.done)
    if stop:
      rows = _row_outputs(state, eos)
      for b, r in enumerate(rows):
        if not stopped[b] and _cut_at_stop(bundle.tokenizer.decode(r, skip_special_tokens=True), stop)[1]:
          stopped[b] = True
      if any(stopped) and not all(done | np.array(stopped)):
        state = state.replace(done=jnp.asarray(done | np.array(stopped)))
      done = done | np.array(stopped)
    if done.all() or int(state.step) >= state.committed.shape[0]:
      break
  jax.block_until_ready(state)
  wall = prefill_s + time.perf_counter() - t1
  _finish_method(bundle, m, state)
  rows = _row_outputs(state, eos)
  texts = []
  for b, r in enumerate(rows):
    text = bundle.tokenizer.decode(r, skip_special_tokens=True)
    texts.append(_cut_at_stop(text, stop)[0] if stop else text)
  committed = sharding.to_host(state.committed)[: int(state.step)]
  hist = np.bincount(committed[committed > 0].ravel(), minlength=m.max_commit + 1).tolist()
  stats = GenerateStats(
      method=m.name, new_tokens=[len(r) + (1 if len(r) < int(g) else 0) for r, g in
                                 zip(rows, sharding.to_host(state.generated))],
      forwards=(1 + (committed > 0).sum(axis=0)).tolist(), steps=int(state.step), wall_s=wall,
      prefill_s=prefill_s, compile_s=c1 + c2, accept_hist=hist)
  return GenerateResult(texts=texts, token_ids=rows, stats=stats)


def stream(bundle: ModelBundle, prompt, method="ar", *, max_new_tokens: int = 128, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed=0, stop: Sequence[str] | None = None,
           chat: bool | None = None, cache_len: int | None = None, attn_impl: str = "auto",
           method_options: dict | None = None, mesh=None, rules=None) -> Iterator[str]:
  """Yield the text of one prompt piece by piece, driving the same compiled step as `generate`."""
  m, sampling, ids, P, state = _prepare(bundle, [prompt] if isinstance(prompt, str) else prompt, method,
                                        max_new_tokens, temperature, top_k, top_p, seed, chat,
                                        cache_len, method_options, mesh, rules)
  if len(ids) != 1:
    raise InvalidOptionError("stream() takes a single prompt")
  eos = bundle.eos_ids
  static = dict(sampling=sampling, eos_ids=eos, attn_impl=attn_impl)
  params, state, prefill_jit, run_steps_jit = sharding.decode_fns(bundle, state, mesh, rules, m)
  aux_params, static = _aux(bundle, m, static)
  aux_params = sharding.aux_params_for(aux_params, bundle, mesh, rules)
  pre, _ = engine.COMPILED.get(prefill_jit, (params, state, aux_params),
                               dict(static, graphdef=bundle.graphdef, prompt_len=P, method=_prefill_method(m)))
  state = pre(params, state, aux_params)
  one = jnp.asarray(1, jnp.int32)
  run, _ = engine.COMPILED.get(run_steps_jit, (params, state, one, aux_params),
                               dict(static, graphdef=bundle.graphdef, method=m))
  shown = ""
  while True:
    row = _row_outputs(state, eos)[0]
    text = bundle.tokenizer.decode(row, skip_special_tokens=True)
    text, hit = _cut_at_stop(text, stop) if stop else (text, False)
    if not text.endswith("\ufffd") and len(text) > len(shown):  # hold back partial UTF-8
      yield text[len(shown):]
      shown = text
    if hit or bool(sharding.to_host(state.done)[0]) or int(state.step) >= state.committed.shape[0]:
      break
    state = run(params, state, one, aux_params)
  _finish_method(bundle, m, state)
