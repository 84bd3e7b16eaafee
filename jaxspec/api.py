"""High-level API: `generate` (batched, on-device loop) and `stream` (yields text as produced)."""

from __future__ import annotations

import dataclasses
import functools
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
  forward_tokens: int = 0  # tokens in the decode steps' forwards, summed (pay per draft: < steps x T)

  @property
  def mean_forward_size(self) -> float:
    """Tokens per decode forward (the method's full size unless it pays per draft)."""
    return self.forward_tokens / self.steps if self.steps else 0.0

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
            f"{self.tokens_per_forward:.2f} tokens/forward, {self.mean_forward_size:.2f} tokens in each "
            f"forward, compile {self.compile_s:.1f}s")


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


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
  """Length of the longest end of `text` that begins a stop string: held back while streaming."""
  best = 0
  for s in stop:
    for k in range(min(len(s) - 1, len(text)), best, -1):
      if text.endswith(s[:k]):
        best = k
        break
  return best


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  cuts = [text.find(s) for s in stop if s and s in text]
  return (text[: min(cuts)], True) if cuts else (text, False)


def _prepare(bundle, prompts, method, max_new_tokens, temperature, top_k, top_p, seed, chat,
             cache_len, method_options, layout=None):
  if max_new_tokens < 1:
    raise InvalidOptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
  m = get_method(method, **(method_options or {})) if isinstance(method, str) else method
  m = m.resolve(bundle)
  ids = encode_prompts(bundle, prompts, chat)
  P, S, max_steps = engine.plan_sizes([len(p) for p in ids], max_new_tokens, m,
                                      bundle.config.max_position_embeddings, cache_len)
  key = jax.random.key(seed) if isinstance(seed, int) else seed
  state = sharding.state_initializer(layout)(bundle.config, ids, max_new_tokens, m, key, S, max_steps, bundle.dtype)
  if m.memory_key and m.memory_key in bundle.method_memory:  # e.g. Token Recycling's adjacency matrix
    state = state.replace(method_state=m.recall(state.method_state, bundle.method_memory.pop(m.memory_key)))
  return m, sampling, ids, P, state


def _finish_method(bundle, m, state):
  """Keep per-bundle method memory; report acceptance to the method (it may adapt)."""
  if m.memory_key:
    bundle.method_memory[m.memory_key] = m.remember(state.method_state)
  hist = sharding.to_host(state.accept_hist)
  active = int(hist.sum())
  if active:
    m.observe(bundle, float((np.arange(hist.size) * hist).sum() / active - 1.0), active)


def reset_method_memory(bundle, method: str | None = None, **options) -> None:
  """Forget what methods learned on this bundle (all, or one method's memory key: the method
  `method` with `options` keeps it under)."""
  if method is None:
    bundle.method_memory.clear()
  else:
    bundle.method_memory.pop(get_method(method, **options).memory_key, None)


@dataclasses.dataclass
class _Call:
  """One prepared generate/stream call: the resolved method, the initial state (on its mesh)
  and the compiled prefill and decode loop. `generate` and `stream` differ only in how many
  steps one loop call runs and in what they read back."""

  bundle: ModelBundle
  method: object
  ids: list[list[int]]
  params: object
  state: object
  mparams: object  # the method's own parameters, or None
  prefill: object
  run: object
  steps_per_call: jax.Array
  compile_s: float

  def run_prefill(self):
    return self.prefill(self.params, self.state, self.mparams)

  def run_steps(self, state):
    return self.run(self.params, state, self.steps_per_call, self.mparams)


def _compile(bundle, prompts, method, max_new_tokens, temperature, top_k, top_p, seed, chat, cache_len,
             method_options, mesh, rules, attn_impl, steps_per_call: int | None) -> _Call:
  """Prepare and compile (or reuse) prefill and loop; steps_per_call None = the whole budget."""
  layout = sharding.layout_for(bundle, mesh, rules)
  m, sampling, ids, P, state = _prepare(bundle, prompts, method, max_new_tokens, temperature, top_k,
                                        top_p, seed, chat, cache_len, method_options, layout)
  # committed to the layout's shardings (leaves already there, e.g. method memory, stay)
  target = m.target_params(bundle)
  params = sharding.place(bundle.params if target is None else target, layout)
  mparams = sharding.place(m.load_params(bundle), layout)
  state = sharding.place(state, layout, m)
  static = dict(sampling=sampling, eos_ids=bundle.eos_ids, attn_impl=attn_impl, graphdef=bundle.graphdef,
                layout=layout)
  # methods without a prefill hook share one compiled prefill
  pre, c1 = engine.COMPILED.get(engine.prefill_jit, (params, state, mparams),
                                dict(static, prompt_len=P, method=m if m.has_prefill else None))
  steps = jnp.asarray(steps_per_call or max(int(state.max_steps), 1), jnp.int32)
  run, c2 = engine.COMPILED.get(engine.run_steps_jit, (params, state, steps, mparams), dict(static, method=m))
  return _Call(bundle, m, ids, params, state, mparams, pre, run, steps, c1 + c2)


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
  call = _compile(bundle, prompts, method, max_new_tokens, temperature, top_k, top_p, seed, chat, cache_len,
                  method_options, mesh, rules, attn_impl, STOP_CHECK_STEPS if stop else None)
  m, eos = call.method, bundle.eos_ids
  max_steps = int(call.state.max_steps)
  t0 = time.perf_counter()
  state = jax.block_until_ready(call.run_prefill())
  prefill_s = time.perf_counter() - t0
  t1 = time.perf_counter()
  stopped = [False] * len(call.ids)
  while True:
    state = call.run_steps(state)
    done = sharding.to_host(state.done)
    if stop:
      rows = _row_outputs(state, eos)
      for b, r in enumerate(rows):
        if not stopped[b] and _cut_at_stop(bundle.tokenizer.decode(r, skip_special_tokens=True), stop)[1]:
          stopped[b] = True
      if any(stopped) and not all(done | np.array(stopped)):
        state = state.replace(done=jnp.asarray(done | np.array(stopped)))
      done = done | np.array(stopped)
    if done.all() or int(state.step) >= max_steps:
      break
  jax.block_until_ready(state)
  wall = prefill_s + time.perf_counter() - t1
  _finish_method(bundle, m, state)
  rows = _row_outputs(state, eos)
  texts = []
  for b, r in enumerate(rows):
    text = bundle.tokenizer.decode(r, skip_special_tokens=True)
    texts.append(_cut_at_stop(text, stop)[0] if stop else text)
  stats = GenerateStats(
      method=m.name, new_tokens=[len(r) + (1 if len(r) < int(g) else 0) for r, g in
                                 zip(rows, sharding.to_host(state.generated))],
      forwards=sharding.to_host(state.forwards).tolist(), steps=int(state.step), wall_s=wall,
      prefill_s=prefill_s, compile_s=call.compile_s, accept_hist=sharding.to_host(state.accept_hist).tolist(),
      forward_tokens=int(state.forward_tokens))
  return GenerateResult(texts=texts, token_ids=rows, stats=stats)


@functools.partial(jax.jit, static_argnames=("width",))
def _row0_since(tokens_BxN, num_tokens_B, done_B, step, start, *, width: int):
  """[3 + width] int32: row 0's committed count, done flag, the step, then `width` buffer tokens
  from `start`: everything `stream` reads after a step, in one device-to-host transfer."""
  new_W = jax.lax.dynamic_slice(tokens_BxN[0], (start,), (width,))
  head = jnp.stack([num_tokens_B[0], done_B[0].astype(jnp.int32), step.astype(jnp.int32)])
  return jnp.concatenate([head, new_W])


class _TextTail:
  """Incremental detokenization: each push decodes only a short window of the newest tokens
  (the text of ids[prefix:] minus that of ids[prefix:read]), so a whole stream costs O(n), and a
  trailing partial UTF-8 character is held back until its bytes are complete."""

  def __init__(self, tokenizer):
    self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

  def _decode(self, ids) -> str:
    return self.tok.decode(ids, skip_special_tokens=True)

  def push(self, new_ids, final: bool = False) -> str:
    self.ids.extend(new_ids)
    before = self._decode(self.ids[self.prefix:self.read])
    text = self._decode(self.ids[self.prefix:])
    if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
      return ""
    self.prefix, self.read = self.read, len(self.ids)
    return text[len(before):]


def stream(bundle: ModelBundle, prompt, method="ar", *, max_new_tokens: int = 128, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed=0, stop: Sequence[str] | None = None,
           chat: bool | None = None, cache_len: int | None = None, attn_impl: str = "auto",
           method_options: dict | None = None, mesh=None, rules=None) -> Iterator[str]:
  """Yield the text of one prompt piece by piece, driving the same compiled step as `generate`
  (one step per loop call). Per step: one small device-to-host read (the new tokens) and the
  detokenization of a few tokens. The pieces join to `generate`'s text."""
  call = _compile(bundle, [prompt] if isinstance(prompt, str) else prompt, method, max_new_tokens, temperature,
                  top_k, top_p, seed, chat, cache_len, method_options, mesh, rules, attn_impl, 1)
  if len(call.ids) != 1:
    raise InvalidOptionError("stream() takes a single prompt")
  eos = set(bundle.eos_ids)
  width = call.method.max_commit + 1  # the most tokens one step (or the prefill) adds
  max_steps = int(call.state.max_steps)
  read = len(call.ids[0])  # buffer index of the first token not yet read
  tail, text, shown = _TextTail(bundle.tokenizer), "", 0
  longest_stop = max((len(x) for x in stop or ()), default=0)
  state = call.run_prefill()
  while True:
    got = sharding.to_host(_row0_since(state.tokens, state.num_tokens, state.done, state.step,
                                       jnp.asarray(read, jnp.int32), width=width))
    num, done, step = int(got[0]), bool(got[1]), int(got[2])
    new = got[3:3 + num - read].tolist()
    read = num
    if any(t in eos for t in new):
      new, done = new[:[t in eos for t in new].index(True)], True
    finished = done or step >= max_steps
    before = len(text)
    text += tail.push(new, final=finished)
    visible = len(text)
    if stop:
      start = max(0, before - longest_stop + 1)  # a stop string ending in the new text starts here or later
      cut, hit = _cut_at_stop(text[start:], stop)
      if hit:
        text, finished = text[:start] + cut, True
      visible = len(text) if finished else len(text) - _stop_prefix_len(text, stop)
    if visible > shown:
      yield text[shown:visible]
      shown = visible
    if finished:
      break
    state = call.run_steps(state)
  _finish_method(bundle, call.method, state)
