"""Lexical Unit Decoding (Sun et al. 2024): a model fine-tuned to predict whole lexical units
decodes them in one forward (training: jaxspec.train.lud).

The forward of a row is [its pending tokens, k-1 placeholders] (one causal chain, positions
consecutive; the layout is packed per row, so a static causal mask serves every row):

* `lud` (lossy, the paper's decoder): the next token comes from the last pending token as in
  AR; then placeholder j's most likely token is committed while every confidence so far is
  >= `beta` (at most k tokens a step), optionally cut where it would repeat an n-gram
  (`no_repeat`). The committed placeholder tokens have no K/V of their own (a placeholder's is
  not the token's), so they stay *pending*: the decode state's `num_tokens - cache.lengths`
  (1 for every other method) and the next forward re-feeds them. With beta > 1 nothing but the
  first token is ever committed: the output is the fine-tuned model's AR.
* `lud:verify=True` (lossless with respect to the fine-tuned model): the confident placeholder
  tokens are a *draft*, verified by the next forward through the shared verifier; the
  placeholders of that forward sit after the draft and give the draft after it when the whole
  draft is accepted. Greedy output equals the model's greedy AR; sampling is exact.

Weights: `adapters` names a LUD adapters folder (jaxspec.train.lud; default: the package's for
the model), merged into the model's weights once at load (`target_params`); "none" decodes the
bundle's weights as they are (a model folder exported by `jaxspec lud export`, whose own
`jaxspec_lud.json` gives the placeholder and k, or any model, to test the mechanism).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.decode_state import DecodeState, pending_counts
from jaxspec.errors import HeadsFileError, InvalidOptionError
from jaxspec.methods.base import Method
from jaxspec.methods.forward_layout import ForwardLayout
from jaxspec.sampling import SamplingConfig, sample_tokens
from jaxspec.verify import Draft, TreeSpec, Verdict, verify

KIND = "lud_adapters"
LUD_META = "jaxspec_lud.json"
PACKAGED = Path(__file__).resolve().parent.parent / "data" / "lud"  # <model name>/params.safetensors + meta.json
PLACEHOLDER = {"smollm2-135m-instruct": 16}  # "<empty_output>": a special token chat never uses


def packed_inputs(state: DecodeState, r_B: jax.Array, T: int, placeholder: int) -> jax.Array:
  """[B, T]: each row's last r tokens of the buffer, then placeholders."""
  j_T = jnp.arange(T, dtype=jnp.int32)
  idx_BxT = jnp.clip(state.num_tokens[:, None] - r_B[:, None] + j_T[None, :], 0, state.tokens.shape[1] - 1)
  real_BxT = jnp.take_along_axis(state.tokens, idx_BxT, axis=1)
  return jnp.where(j_T[None, :] < r_B[:, None], real_BxT, placeholder).astype(jnp.int32)


def at_slots(x_BxTx, start_B: jax.Array, n: int):
  """[B, n, ...]: x[b, start[b] + j] for j < n (clipped to the last slot)."""
  idx = jnp.clip(start_B[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :], 0, x_BxTx.shape[1] - 1)
  return jnp.take_along_axis(x_BxTx, idx.reshape(idx.shape + (1,) * (x_BxTx.ndim - 2)), axis=1)


def confident_run(conf_BxJ: jax.Array, beta: float) -> jax.Array:
  """[B] length of the leading run of confidences >= beta."""
  return jnp.sum(jnp.cumprod(conf_BxJ >= beta, axis=1), axis=1).astype(jnp.int32)


def repeat_cut(tokens_BxN: jax.Array, num_B: jax.Array, span_BxK: jax.Array, n_B: jax.Array, ngram: int) -> jax.Array:
  """[B] n cut before the first span token (after the first, always kept) that ends an n-gram
  already in the row's committed tokens or earlier in the span (repetition control)."""
  B, K = span_BxK.shape
  write = lambda row, new, start: jax.lax.dynamic_update_slice(row, new, (start,))
  ext_BxN = jax.vmap(write)(tokens_BxN, span_BxK, num_B)
  N = ext_BxN.shape[1]
  q_N = jnp.arange(N, dtype=jnp.int32)
  keep_B = n_B
  for j in range(K - 1, 0, -1):  # from the back: the smallest repeating j wins
    end_B = num_B + j  # index of span token j
    gram = [jnp.take_along_axis(ext_BxN, jnp.maximum(end_B - o, 0)[:, None], axis=1) for o in range(ngram)]
    hit_BxN = (q_N[None, :] >= ngram - 1) & (q_N[None, :] < end_B[:, None])
    for o in range(ngram):
      hit_BxN &= jnp.roll(ext_BxN, o, axis=1) == gram[o]
    repeats_B = jnp.any(hit_BxN, axis=1) & (end_B - (ngram - 1) >= 0)
    keep_B = jnp.where(repeats_B & (j < n_B), j, keep_B)
  return keep_B


@struct.dataclass
class DraftState:
  draft_BxD: jax.Array  # [B, k-1] tokens after the pending one (verify mode)
  n_B: jax.Array  # [B] how many of them are drafts


@dataclasses.dataclass(frozen=True)
class LUD(Method):
  """Options: `adapters` (folder, None = packaged, "none" = the bundle's weights), `beta`
  (confidence to commit or draft a placeholder's token), `k` (longest unit; 0 = the adapters'),
  `no_repeat` (n-gram size for repetition control, 0 = off; lossy mode), `verify`,
  `placeholder` (token id; -1 = from the adapters / model folder / a per-model default)."""

  adapters: str | None = None
  beta: float = 0.6
  k: int = 0
  no_repeat: int = 0
  verify_drafts: bool = False  # the `verify=True` option (see `make`)
  placeholder: int = -1
  name = "lud"

  def __post_init__(self):
    if not self.beta > 0 or self.no_repeat < 0 or (self.k and self.k < 2):
      raise InvalidOptionError(f"lud needs beta > 0, no_repeat >= 0 and k >= 2, got beta={self.beta}, "
                               f"no_repeat={self.no_repeat}, k={self.k}")
    if self.verify_drafts and self.no_repeat:
      raise InvalidOptionError("lud:verify=True is lossless: no_repeat (which changes the output) does not apply")

  # ---- resolution: weights, placeholder and k ---------------------------------------------

  def _adapters_path(self, bundle) -> Path:
    if self.adapters:
      return Path(self.adapters)
    path = PACKAGED / bundle.name
    if not (path / "meta.json").is_file():
      raise HeadsFileError(f"no packaged LUD adapters for {bundle.name!r}; train them with `jaxspec train lud "
                           f"--model {bundle.name}` and pass --method lud:adapters=DIR (or adapters=none for a "
                           f"model folder that is already fine-tuned)")
    return path

  def resolve(self, bundle) -> "LUD":
    if self.adapters is not None and self.placeholder >= 0 and self.k:  # resolved (or fully given)
      return self
    own = Path(bundle.path) / LUD_META if bundle.path is not None else None
    if self.adapters in (None, "none") and own is not None and own.is_file():  # an exported fine-tuned model
      meta, adapters = json.loads(own.read_text()), "none"
    elif self.adapters == "none":
      meta, adapters = {}, "none"
    else:
      from jaxspec.heads_file import read_meta
      path = self._adapters_path(bundle)
      meta, adapters = read_meta(path), str(path)
      if meta.get("kind") != KIND:
        raise HeadsFileError(f"{path} holds {meta.get('kind')!r} parameters, not LUD adapters")
    ph = self.placeholder if self.placeholder >= 0 else int(meta.get("placeholder_id", PLACEHOLDER.get(
        bundle.name, bundle.config.vocab_size - 1)))
    if not 0 <= ph < bundle.config.vocab_size:
      raise InvalidOptionError(f"lud placeholder {ph} is outside the vocabulary")
    return dataclasses.replace(self, adapters=adapters, placeholder=ph, k=self.k or int(meta.get("k", 4)))

  def target_params(self, bundle):
    """The base weights with the adapters merged (once per bundle and folder); None: the bundle's."""
    if self.adapters in (None, "none"):
      return None
    from jaxspec.heads_file import load_params_file
    from jaxspec.train.lora import merge
    key = (KIND, self.adapters)
    if key not in bundle.method_memory:
      adapters, meta = load_params_file(self.adapters, bundle, KIND)
      adapters = {n: jnp.asarray(v, jnp.float32) for n, v in adapters.items()}
      merged = jax.jit(lambda p, a: merge(p, a, float(meta["lora_scale"])))(bundle.params, adapters)
      if getattr(bundle, "huge_pages", False):  # the merged weights live where the bundle's do
        from jaxspec.models.host_arena import into_huge_pages
        merged = into_huge_pages(merged)
      bundle.method_memory[key] = merged
    return bundle.method_memory[key]

  # ---- the forward's layout ------------------------------------------------------------

  def _check_resolved(self):
    if not self.k or self.placeholder < 0:
      raise InvalidOptionError("lud must be resolved against a model first (generate does this)")

  @property
  def tree(self) -> TreeSpec:
    """Lossy: every forward token in one chain (the pending ones and the placeholders);
    verify: the verified part, the pending token and up to k-1 drafts."""
    self._check_resolved()
    return TreeSpec.chain(self.k - 1) if self.verify_drafts else self.forward_layout.tree

  @property
  def forward_layout(self) -> ForwardLayout:
    """One causal chain of 2k-1 tokens: up to k real inputs (pending tokens, or the pending
    token and its drafts), then k-1 placeholders, packed per row (so one static mask serves)."""
    self._check_resolved()
    return ForwardLayout(TreeSpec.chain(2 * self.k - 2))

  @property
  def forward_sizes(self) -> tuple[int, ...]:
    return tuple(range(self.k, 2 * self.k))  # a row with r real inputs needs r + k - 1

  @property
  def max_commit(self) -> int:
    return self.k

  # ---- state and step ------------------------------------------------------------------

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    if not self.verify_drafts:
      return ()
    return DraftState(draft_BxD=jnp.zeros((batch_size, self.k - 1), jnp.int32),
                      n_B=jnp.zeros((batch_size,), jnp.int32))

  def method_state_axes(self, method_state):
    return DraftState(draft_BxD=("batch", None), n_B=("batch",)) if self.verify_drafts else None

  def _real_inputs(self, state: DecodeState) -> jax.Array:
    """[B] real (non-placeholder) inputs of each row's forward."""
    if self.verify_drafts:
      return 1 + state.method_state.n_B
    return pending_counts(state)

  def propose(self, model, mparams, state: DecodeState, sampling, key, attn_impl="auto"):
    T = self.scratch_tokens  # 2k - 1
    r_B = self._real_inputs(state)
    tokens = packed_inputs(state, pending_counts(state), T, self.placeholder)
    if self.verify_drafts:  # pending token, then the drafts, then placeholders
      ms: DraftState = state.method_state
      j_T = jnp.arange(T)[None, :]
      drafts_BxT = jnp.pad(ms.draft_BxD, ((0, 0), (1, T - self.k)))
      tokens = jnp.where((j_T >= 1) & (j_T < r_B[:, None]), drafts_BxT, tokens)
    # what the forward must hold; a finished row asks for the smallest size (its pending tokens
    # would otherwise keep the whole batch on the largest forward)
    r_B = jnp.where(state.done, 1, r_B)
    valid = jnp.arange(T)[None, :] < (r_B + self.k - 1)[:, None]
    context = (state.tokens, state.num_tokens) if self.no_repeat else None  # for repetition control
    return Draft(tokens=tokens, valid=valid, context=context), state.method_state

  def _placeholder_tokens(self, logits_BxTxV, start_B, sampling: SamplingConfig, key):
    """(tokens [B, k-1], confidences [B, k-1]) of the placeholders from slot `start`."""
    ph_logits = at_slots(logits_BxTxV, start_B, self.k - 1)
    toks = sample_tokens(ph_logits, key, sampling)
    probs = jax.nn.softmax(ph_logits.astype(jnp.float32), axis=-1)
    return toks, jnp.take_along_axis(probs, toks[..., None], axis=-1)[..., 0]

  def verify(self, draft: Draft, logits_BxTxV, sampling: SamplingConfig, key, target=None) -> Verdict:
    if self.verify_drafts:  # the shared verifier over the pending token and the drafts only
      r_B = jnp.sum(draft.valid, axis=1) - (self.k - 1)
      drafted = draft.replace(valid=jnp.arange(self.k)[None, :] < r_B[:, None], tokens=draft.tokens[:, :self.k])
      return verify(self.tree, drafted, logits_BxTxV[:, :self.k], sampling, key, False, target)
    r_B = jnp.sum(draft.valid, axis=1) - (self.k - 1)  # pending inputs
    k1, k2 = jax.random.split(key)
    first_B = sample_tokens(jnp.take_along_axis(logits_BxTxV, (r_B - 1)[:, None, None], axis=1)[:, 0], k1, sampling)
    rest, conf = self._placeholder_tokens(logits_BxTxV, r_B, sampling, k2)
    tokens = jnp.concatenate([first_B[:, None], rest], axis=1)  # [B, k]
    n_B = 1 + confident_run(conf, self.beta)
    if self.no_repeat:
      tokens_BxN, num_B = draft.context
      n_B = repeat_cut(tokens_BxN, num_B, tokens, n_B, self.no_repeat)
    path = jnp.broadcast_to(jnp.arange(self.k, dtype=jnp.int32), tokens.shape)
    return Verdict(path=path, n=n_B, tokens=tokens, keep=r_B)

  def update(self, method_state, state, draft: Draft, logits_BxTxV, hidden, verdict: Verdict, n_B):
    if not self.verify_drafts:
      return method_state
    ms: DraftState = method_state
    r_B = 1 + ms.n_B
    toks, conf = self._placeholder_tokens(logits_BxTxV, r_B, SamplingConfig(), None)
    all_accepted = verdict.n == r_B
    return DraftState(draft_BxD=toks, n_B=jnp.where(all_accepted & (n_B > 0), confident_run(conf, self.beta), 0))


def make(verify: bool = False, **options) -> LUD:
  """The registry's constructor: `lud:verify=True` maps to the `verify_drafts` field (a method's
  `verify` is its verification rule)."""
  return LUD(verify_drafts=bool(verify), **options)
