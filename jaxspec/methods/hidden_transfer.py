"""Hidden-transfer heads (Wu et al. 2024): trained linear maps turn the layer-t residual of the
last accepted token into pseudo hidden states of the next k positions; those run through the
upper blocks t..L-1 attending to the committed context, and the LM head turns them into
drafts. The shared verifier checks the drafts, so the output is the base model's (greedy
identical, sampling exact): the heads only decide how many tokens a step commits.

Where drafting happens (the design question the paper leaves open; see experiments/NOTES.md):
the verification forward of step s captures the layer-t residual of every tree node; the
method keeps the accepted node's, and step s+1 begins with a partial pass of k pseudo tokens
through blocks t..L-1 over the committed cache (`pseudo_logits`). With t near the top this
costs a fraction of one forward; no full extra forward per step.

Drafts form a Medusa-style tree: node (depth d, slot c) holds the c-th most likely token of
offset d; the template keeps the most probable paths under the acceptance measured when the
heads were trained, and with `adaptive` each step verifies the prefix of it that pays
(jaxspec.methods.draft_sizing). The first step drafts from the last prompt token's residual,
captured by the prompt's forward (the prefill hook).

With `recycle=k` the nodes below depth 1 come from a Token Recycling matrix (the top-k tokens
the model last predicted after each token, jaxspec.methods.token_recycling): a child then
depends on its parent's token, which a head's offset >= 2 cannot (the heads draft each offset
from the anchor alone). The heads draft depth 1, where they are strong; the matrix persists
across calls on a bundle like recycling's. The matrix row of the pending token also drafts at
depth 1 (`root_recycle=j`): the heads' top-1, then the row's top-1, the heads' next ones, then
the row's next ones, duplicates dropped. The two disagree where either is wrong: on held-out
text the heads' top-2 hold the next token 0.47 of the time, the heads' top-1 and the row's top-1
0.51 with 1.6 distinct tokens (experiments/depth1_union.py).

With `lookup=L` a prompt-lookup chain is grafted on the tree's main path where the text repeats
(jaxspec.methods.lookup_graft): a 3-token match is right four times in five here, far above
what the heads draft; a step whose whole draft is the grafted chain skips the partial pass.

Heads may also read the pending token (the tree's root, known when drafting): `U_KxExE` maps
its input embedding into each pseudo state, which matters when sampling (the sampled token is
not the anchor's argmax, which the residual alone implies).

Heads folder: `params.safetensors` (W_KxExE, b_KxE, optional U_KxExE) + `meta.json` (jaxspec.heads_file), made
by `jaxspec train hidden-transfer`. The package ships heads for its default model.
"""

from __future__ import annotations

import dataclasses
import time
from functools import cached_property
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.decode_state import DecodeState, last_tokens
from jaxspec.errors import HeadsFileError, InvalidOptionError
from jaxspec.methods import draft_sizing, tree_templates
from jaxspec.methods.base import Method
from jaxspec.methods.lookup_graft import check_options, graft, grafted_priors, main_path_lookup, num_contexts
from jaxspec.methods.prompt_lookup import prior_accept
from jaxspec.methods.token_recycling import fill_from_matrix, recycle
from jaxspec.verify import Draft, DynamicTree, TreeSpec

KIND = "hidden_transfer_heads"
# depth 1 with root_recycle, measured on 26 held-out prompts' greedy text (experiments/depth1_union.py)
ROW_AFTER_HEAD = (0.18, 0.01)  # the row's top-1 / later ranks, right where no earlier candidate is
HEAD_SHARE_LOST = 0.3  # the heads' ranks >= 2 are right this much less often after the row's top-1
# dynamic trees: a recycled candidate is right about this fraction of its stored probability (the row
# was written in another context; experiments/dynamic_tree_sim.py, 26 held-out prompts' greedy text)
ROW_CONFIDENCE = 0.6
PACKAGED = Path(__file__).resolve().parent.parent / "data" / "heads"  # <model name>/params.safetensors + meta.json


def init_heads(key, k: int, embed_dim: int, noise: float = 1e-3, token_input: bool = False) -> dict[str, jax.Array]:
  """Heads that start as the identity (pseudo state = the anchor's state) plus small noise.
  `token_input`: also read the pending token (U_KxExE, zero at init), see `pseudo_states`."""
  eye = jnp.broadcast_to(jnp.eye(embed_dim, dtype=jnp.float32), (k, embed_dim, embed_dim))
  heads = {"W_KxExE": eye + noise * jax.random.normal(key, (k, embed_dim, embed_dim)),
           "b_KxE": jnp.zeros((k, embed_dim), jnp.float32)}
  if token_input:
    heads["U_KxExE"] = jnp.zeros((k, embed_dim, embed_dim), jnp.float32)
  return heads


def reads_token(heads) -> bool:
  """Whether the heads also read the pending token's embedding (heads with U_KxExE)."""
  return "U_KxExE" in heads


def pseudo_states(heads, h_BxE: jax.Array, e_BxE: jax.Array | None = None) -> jax.Array:
  """[B, k, E]: pseudo_i = h W_i + b_i (+ e U_i for heads that read the pending token, whose input
  embedding is e: the token after the anchor, known when drafting, sampled or not)."""
  h = h_BxE.astype(jnp.float32)
  x = jnp.einsum("be,kef->bkf", h, heads["W_KxExE"]) + heads["b_KxE"][None]
  if reads_token(heads):
    x = x + jnp.einsum("be,kef->bkf", e_BxE.astype(jnp.float32), heads["U_KxExE"])
  return x


def pseudo_logits(model, heads, cache, h_BxE: jax.Array, layer: int, attn_impl="auto",
                  pending_B: jax.Array | None = None, offsets: int | None = None) -> jax.Array:
  """[B, k, V]: the pseudo states of the token after each row's committed prefix, through blocks
  layer..L-1 at positions lengths + i (pseudo i stands at the i-th next position and predicts
  the token after it), attending to the committed prefix (`cache.lengths`) and causally to each
  other. `pending_B`: the token at position lengths (needed by heads that read it). The one
  drafting forward of decoding and of training. `offsets`: only the first n pseudo states
  ([B, n, ...]). Heads loaded with a draft vocabulary (`head_ExN`, see `load_params`) give
  logits over its N tokens only ([..., N]; `vocab_N` maps them back to token ids)."""
  if reads_token(heads) and pending_B is None:
    raise ValueError("these heads read the pending token: pass pending_B")
  if offsets is not None:
    heads = {n: (v[:offsets] if n in ("W_KxExE", "b_KxE", "U_KxExE") else v) for n, v in heads.items()}
  e_BxE = model.embed_VxE[...][pending_B] if reads_token(heads) else None
  x_BxKxE = pseudo_states(heads, h_BxE, e_BxE)
  B, k, _ = x_BxKxE.shape
  positions = cache.lengths[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
  dtype = cache.k[layer].dtype  # the model's compute dtype
  # a sub-vocabulary head only when the heads have one: a user's model needs `head_ExN` (and
  # `head_columns`) only to decode with such heads
  sub = {"head_ExN": heads["head_ExN"]} if "head_ExN" in heads else {}
  logits, _, _ = model(cache, None, positions, jnp.tril(jnp.ones((k, k), bool)), attn_impl=attn_impl,
                       start_layer=layer, inputs_BxTxE=x_BxKxE.astype(dtype), **sub)
  return logits


def default_heads(model_name: str) -> Path:
  path = PACKAGED / model_name
  if not (path / "meta.json").is_file():
    raise HeadsFileError(f"no packaged hidden-transfer heads for {model_name!r}; train them with "
                         f"`jaxspec train hidden-transfer --model {model_name}` and pass "
                         f"--method hidden_transfer:heads=DIR")
  return path


def partial_pass_cost(bundle, method: "HiddenTransfer", context: int = 128, repeats: int = 9) -> float:
  """The partial pass's time relative to a 1-token forward, both timed in the same interleaved
  rounds after `context` committed tokens (median); once per bundle, heads and pass shape."""
  from flax import nnx
  from jaxspec.models.kv_cache import init_cache
  heads = method._drafting_params(method.load_params(bundle))
  key = ("hidden_transfer_pass_cost", method.heads, method.offsets, "vocab_N" in heads, context)
  if key in bundle.method_memory:
    return bundle.method_memory[key]
  model = lambda params: nnx.merge(bundle.graphdef, params)
  cache = init_cache(bundle.config, 1, -(-(context + method.k + 1) // 128) * 128, bundle.dtype)
  cache = cache.replace(lengths=jnp.asarray([context], jnp.int32))
  one = jnp.ones((1, 1), jnp.int32)
  mask = jnp.ones((1, 1), bool)
  forward = jax.jit(lambda p, c: model(p)(c, one, c.lengths[:, None], mask, write_cache=False)[0])
  pseudo = jax.jit(lambda p, hp, c: pseudo_logits(model(p), hp, c, jnp.ones((1, bundle.config.embed_dim)),
                                                  method.layer, pending_B=one[:, 0], offsets=method.offsets))
  runs = {"forward": lambda: forward(bundle.params, cache), "pass": lambda: pseudo(bundle.params, heads, cache)}
  times = {n: [] for n in runs}
  for f in runs.values():
    jax.block_until_ready(f())  # compile
  for _ in range(repeats):
    for n, f in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[n].append(time.perf_counter() - t0)
  bundle.method_memory[key] = float(np.median(times["pass"]) / np.median(times["forward"]))
  return bundle.method_memory[key]


@struct.dataclass
class HTState:
  h_BxE: jax.Array  # layer-t residual of each row's last accepted token (f32)
  has_h_B: jax.Array  # [B] bool: the row has an anchor (set by prefill)
  sizing: draft_sizing.SizingStats
  M_Vxk: jax.Array  # [V, recycle] int32: recycled next tokens per token ([V, 0] without `recycle`)
  seen_V: jax.Array  # [V] bool: the token's matrix row was written
  P_Vxk: jax.Array  # [V, recycle] float32: the recycled candidates' probabilities when written ([V, 0]: not kept)
  drafted_B: jax.Array  # [B] bool: the row verified a draft last step (dynamic: the heads run for such rows)


@dataclasses.dataclass(frozen=True)
class HiddenTransfer(draft_sizing.PrefixSizing, Method):
  """`heads`: a heads folder (default: the packaged heads of the model). `nodes`: verified tree
  nodes (drafts, root excluded) or "auto" (picked from the measured forward times). `lookup`:
  length of a prompt-lookup chain grafted on the main path (0: none), from n-gram matches of
  min_ngram..max_ngram tokens. `recycle`: candidates per token of the recycled matrix that
  drafts depths >= 2 (0: the heads draft every depth up to k). `root_recycle`: candidates of the
  pending token's matrix row merged into depth 1 after the heads' top-1. `draft_vocab`: rank the heads'
  drafts over the frequent-token vocabulary saved with the heads (`vocab_N`, when the file has
  one) instead of the whole vocabulary: the partial pass then reads N/V of the LM head.
  `dynamic`: each step, each row verifies the `nodes` most probable nodes of a `pool`-node
  candidate tree instead of a fixed template (EAGLE-2's rule; DySpec grows trees the same way):
  a node's probability is its parent's times its own confidence, the heads' softmax probability
  at depth 1, a recycled candidate's stored probability (x ROW_CONFIDENCE), a lookup token's
  prior for its matched n; pay per draft then sizes each row's tree from those probabilities.
  Rows' trees differ, so the forward's attention takes a [B, T, T] mask (the XLA path: the Pallas
  kernels take one mask per batch)."""

  heads: str | None = None
  nodes: int | str = 12
  adaptive: bool = True
  lookup: int = 5  # measured: MAT 1.73 -> 2.21 on unseen prompts (experiments/LOG.md, session 11)
  max_ngram: int = 3
  min_ngram: int = 2
  recycle: int = 8  # measured: MAT 2.21 -> 2.29 at 12 nodes drafting every step (experiments/LOG.md, session 12)
  root_recycle: int = 2  # with recycle: depth-1 candidates from the pending token's matrix row
  draft_vocab: bool = True
  sizes: tuple[int, ...] | str | None = None  # adaptive: forward sizes, e.g. "1/4/9/14"; None: prefix_sizes
  cost: tuple[float, ...] | None = None  # forward time per prefix size / one token; None: measured
  pass_cost: float = 0.0  # the partial pass / one 1-token forward; measured at resolve along with `cost`
  max_loss: float | None = None  # adaptive: bound the time lost to rejected drafts (`auto`: 0.05)
  dynamic: bool = False
  pool: int = 48  # dynamic: candidate nodes the verified ones are chosen from
  # resolved from the heads' meta.json
  layer: int = 0
  k: int = 0
  accept: tuple[tuple[float, ...], ...] = ()  # [offset][slot]: measured P(teacher argmax is slot c)
  name = "hidden_transfer"
  has_prefill = True

  def __post_init__(self):
    if not (self.nodes == "auto" or (isinstance(self.nodes, int) and self.nodes >= 1)):
      raise InvalidOptionError(f"hidden_transfer nodes must be a positive count or 'auto', got {self.nodes!r}")
    check_options("hidden_transfer", self.lookup, self.min_ngram, self.max_ngram)
    draft_sizing.check_max_loss("hidden_transfer", self.max_loss)
    self._normalise_sizes()
    if not 0 <= self.recycle <= len(tree_templates.PRIOR_SLOT_ACCEPT):
      raise InvalidOptionError(f"hidden_transfer recycle must be in [0, {len(tree_templates.PRIOR_SLOT_ACCEPT)}], "
                               f"got {self.recycle!r}")
    if self.dynamic and (not self.recycle or not isinstance(self.nodes, int) or not 1 <= self.nodes <= self.pool):
      raise InvalidOptionError(f"hidden_transfer dynamic trees need recycle >= 1 and 1 <= nodes <= pool, got "
                               f"recycle={self.recycle}, nodes={self.nodes!r}, pool={self.pool}")
    if self.root_recycle < 0 or (self.recycle and self.root_recycle > self.recycle):
      raise InvalidOptionError(f"hidden_transfer root_recycle must be in [0, recycle={self.recycle}] (the matrix "
                               f"holds recycle candidates per token), got {self.root_recycle!r}")

  @property
  def memory_key(self) -> str | None:
    """With `recycle`, the recycled matrix persists across calls on a bundle under this key."""
    if not self.recycle:
      return None
    return f"hidden_transfer_recycled_k{self.recycle}" + ("_probs" if self.dynamic else "")

  def remember(self, ms: "HTState"):
    return (ms.M_Vxk, ms.seen_V, ms.P_Vxk)

  def recall(self, ms: "HTState", memory):
    M_Vxk, seen_V, P_Vxk = memory
    return ms.replace(M_Vxk=M_Vxk, seen_V=seen_V, P_Vxk=P_Vxk)

  def _path(self, bundle) -> Path:
    return Path(self.heads) if self.heads else default_heads(bundle.name)

  def resolve(self, bundle) -> "HiddenTransfer":
    from jaxspec.heads_file import read_meta
    if self.k:
      return self
    path = self._path(bundle)
    meta = read_meta(path)
    if meta.get("kind") != KIND:
      raise HeadsFileError(f"{path} holds {meta.get('kind')!r} parameters, not hidden-transfer heads")
    accept = tuple(tuple(float(a) for a in row) for row in meta["eval"]["accept_by_offset_slot"])
    m = dataclasses.replace(self, heads=str(path), layer=int(meta["layer"]), k=int(meta["k"]), accept=accept)
    if not 1 <= m.layer < bundle.config.num_layers:
      raise HeadsFileError(f"{path}: layer {m.layer} outside 1..{bundle.config.num_layers - 1}")
    if m.nodes == "auto":  # every drafting step pays the partial pass too: price it into the choice
      m = dataclasses.replace(m, nodes=m._pick_nodes(bundle, partial_pass_cost(bundle, m)))
    if m.sized and m.cost is None:
      m = dataclasses.replace(m, cost=draft_sizing.measured_cost(bundle, m.forward_sizes),
                              pass_cost=partial_pass_cost(bundle, m))
    return m

  @property
  def step_cost(self):
    """Per draft context, the forward's cost plus the partial pass wherever a size verifies a
    head's draft: every size > 1 without a lookup match; with one (context n >= 1) the main
    path's first `lookup` nodes are grafted, so only sizes past them."""
    sizes, cost = self.forward_sizes, self.cost
    if self.dynamic:  # the pass runs on every step that may draft
      return tuple(c + (self.pass_cost if s > 1 else 0.0) for s, c in zip(sizes, cost))
    grafted = lambda c: self.lookup if c else 0
    return tuple(tuple(cost[i] + (self.pass_cost if s > 1 + grafted(c) else 0.0) for i, s in enumerate(sizes))
                 for c in range(num_contexts(self.lookup, self.max_ngram)))

  def load_params(self, bundle):
    """The heads (checked against the bundle's model), loaded once per bundle and path. Heads
    with a draft vocabulary (`vocab_N`) also get `head_ExN`, its LM-head columns (gathered once)."""
    from jaxspec.heads_file import load_params_file
    key = (KIND, self.heads)
    if key not in bundle.method_memory:
      params, meta = load_params_file(self.heads, bundle, KIND)
      if params["W_KxExE"].shape[0] != self.k:
        raise HeadsFileError(f"{self.heads}: meta says k={self.k}, weights have {params['W_KxExE'].shape[0]}")
      unknown = set(params) - {"W_KxExE", "b_KxE", "U_KxExE", "vocab_N"}
      if unknown or ("U_KxExE" in params and params["U_KxExE"].shape != params["W_KxExE"].shape):
        raise HeadsFileError(f"{self.heads}: unexpected head arrays {sorted(unknown) or ['U_KxExE (shape)']}")
      vocab = params.get("vocab_N")
      if vocab is not None and (vocab.ndim != 1 or not np.issubdtype(vocab.dtype, np.integer) or vocab.size < 8
                                or vocab.min() < 0 or vocab.max() >= bundle.config.vocab_size):
        raise HeadsFileError(f"{self.heads}: vocab_N must be >= 8 token ids of this model's vocabulary")
      loaded = {n: jnp.asarray(v) for n, v in params.items()}
      if vocab is not None:
        from flax import nnx
        loaded["vocab_N"] = loaded["vocab_N"].astype(jnp.int32)
        loaded["head_ExN"] = nnx.merge(bundle.graphdef, bundle.params).head_columns(loaded["vocab_N"])
      bundle.method_memory[key] = loaded
    return bundle.method_memory[key]

  @property
  def offsets(self) -> int:
    """Pseudo offsets the partial pass runs: the depths a head drafts."""
    return 1 if self.recycle else self.k

  def _drafting_params(self, mparams):
    """The heads as the partial pass uses them (without the draft vocabulary unless `draft_vocab`)."""
    if self.draft_vocab:
      return mparams
    return {n: v for n, v in mparams.items() if n not in ("vocab_N", "head_ExN")}

  # ---- the tree ------------------------------------------------------------------------

  def _slot_prior(self) -> tuple[float, ...]:
    return tuple(float(np.mean([row[c] for row in self.accept])) for c in range(len(self.accept[0])))

  @cached_property
  def _depth1_order(self) -> tuple[tuple[str, int], ...]:
    """Depth-1 candidates before duplicates are dropped: ("head", rank) or ("row", rank): the
    heads' top-1, the pending token's matrix row's top-1, the heads' others, the row's others."""
    heads = [("head", c) for c in range(len(self.accept[0]))]
    row = [("row", c) for c in range(self.root_recycle if self.recycle else 0)]
    return tuple(heads[:1] + row[:1] + heads[1:] + row[1:])

  def _depth1_prior(self) -> tuple[float, ...]:
    """Per depth-1 slot: prior acceptance. The heads' measured acceptance by rank; a row
    candidate after the heads' top-1 is right ROW_AFTER_HEAD[r] of the time, and the heads'
    later ranks lose HEAD_SHARE_LOST of theirs to it (measured: experiments/depth1_union.py)."""
    if not self.root_recycle or not self.recycle:
      return tuple(self.accept[0])
    shrink = 1.0 - HEAD_SHARE_LOST
    return tuple(self.accept[0][c] * (shrink if c else 1.0) if src == "head" else ROW_AFTER_HEAD[min(c, 1)]
                 for src, c in self._depth1_order)

  def _template(self, num_nodes: int):
    if self.recycle:
      return tree_templates.best_paths_template(num_nodes, self._depth1_prior(), max_depth=self.k,
                                                deeper_accept=tree_templates.PRIOR_SLOT_ACCEPT[: self.recycle])
    return tree_templates.best_paths_template(num_nodes, self._slot_prior(), max_depth=self.k)

  @cached_property
  def _tree_and_slots(self):
    if not self.k:
      raise InvalidOptionError("hidden_transfer must be resolved against a model first (generate does this)")
    tree, slots = self._template(int(self.pool if self.dynamic else self.nodes))
    return tree_templates.main_chain_first(tree, slots, self.lookup) if self.lookup else (tree, slots)

  def _pick_nodes(self, bundle, pass_cost: float = 0.0) -> int:
    """The template size with the best expected tokens/s on this device's forward-time curve, a
    step costing its forward plus the partial pass (`pass_cost`, relative to a 1-token forward)."""
    from jaxspec.profiling import forward_time_curve
    options = (2, 4, 8, 12, 16, 24)
    curve = forward_time_curve(bundle, [1] + [n + 1 for n in options])
    rate = {n: (1 + self._expected(self._template(n))) / (curve[n + 1] / curve[1] + pass_cost) for n in options}
    return max(rate, key=rate.get)

  def _expected(self, tree_slots) -> float:
    """Expected accepted drafts of the whole tree at the measured acceptance (scale g = 1)."""
    tree, slots = tree_slots
    table = draft_sizing.expected_table(tree.parents, self._node_accept(tree, slots))
    return float(table[-1][int(np.argmin(np.abs(draft_sizing.SCALES - 1.0)))])

  def _node_accept(self, tree, slots) -> list[float]:
    depth = tree.depth  # a grafted main path may reach past the heads' k offsets: no head draft there

    def prior(d, c):
      if self.recycle and d >= 2:
        return tree_templates.PRIOR_SLOT_ACCEPT[c]
      if self.recycle and d == 1:
        return self._depth1_prior()[c]
      return self.accept[d - 1][c] if d <= self.k else 0.0

    return [0.0] + [prior(depth[i], slots[i]) for i in range(1, tree.size)]

  def _from_heads(self, depth) -> np.ndarray:
    """[T] bool: nodes whose token a head drafts (not the root; with `recycle` depth 1 only)."""
    return (depth >= 1) & (depth <= (1 if self.recycle else self.k))

  @property
  def tree(self) -> TreeSpec | DynamicTree:
    """The verified tree: the template, or with `dynamic` the bounds of the trees rows choose."""
    pool = self._tree_and_slots[0]
    if not self.dynamic:
      return pool
    return DynamicTree(size=int(self.nodes) + 1, max_depth=pool.max_depth, max_children=pool.children.shape[1])

  @property
  def scratch_tokens(self) -> int:
    return self.tree.size

  @property
  def capture(self) -> tuple[int, ...]:
    return (self.layer - 1,)

  def node_prior(self) -> list[float]:
    return self._node_accept(*self._tree_and_slots)

  def context_priors(self) -> list[list[float]]:
    return grafted_priors(self.node_prior(), self.lookup, self.max_ngram) if self.lookup else [self.node_prior()]

  # ---- state and step ------------------------------------------------------------------

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    return HTState(h_BxE=jnp.zeros((batch_size, config.embed_dim), jnp.float32),
                   has_h_B=jnp.zeros((batch_size,), bool),
                   sizing=draft_sizing.init_stats(num_contexts(self.lookup, self.max_ngram), batch_size, self.max_loss),
                   M_Vxk=jnp.zeros((config.vocab_size, self.recycle), jnp.int32),
                   seen_V=jnp.zeros((config.vocab_size,), bool),
                   P_Vxk=jnp.zeros((config.vocab_size, self.recycle if self.dynamic else 0), jnp.float32),
                   drafted_B=jnp.ones((batch_size,), bool))

  def method_state_axes(self, method_state):
    sizing = draft_sizing.SizingStats(err_CxG=(None, None), ahead_B=(None,), max_loss=())
    return HTState(h_BxE=("batch", "embed"), has_h_B=("batch",), sizing=sizing, M_Vxk=(None, None), seen_V=(None,),
                   P_Vxk=(None, None), drafted_B=("batch",))

  def prefill(self, model, mparams, state: DecodeState, prompt_len: int, attn_impl, hidden):
    """The first anchor: the last prompt token's layer-t residual, from the prompt's own forward."""
    ms: HTState = state.method_state
    h_BxE = jnp.take_along_axis(hidden[self.layer - 1], (state.prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    return ms.replace(h_BxE=h_BxE.astype(jnp.float32), has_h_B=jnp.ones_like(ms.has_h_B))

  def propose(self, model, mparams, state: DecodeState, sampling, key, attn_impl="auto"):
    ms: HTState = state.method_state
    if self.dynamic:
      return self._propose_dynamic(model, mparams, state, attn_impl), ms
    limit = lambda valid, context_B, grafted: self.limit(valid, ms.sizing, context_B)
    tokens, valid, context_B, _ = self._fill(model, mparams, state, attn_impl, limit, None)
    return Draft(tokens=tokens, valid=valid, context=context_B), ms

  def _fill(self, model, mparams, state: DecodeState, attn_impl, limit, wants_heads_B):
    """The template (or pool) filled for this step: (tokens [B, T], valid [B, T], context [B] or
    None, own confidence [B, T] or None). `limit(valid, context, grafted)`: the nodes that may
    be verified, known before the heads run; the partial pass runs only if one of them is a
    head's draft in a row of `wants_heads_B` ([B] bool; None: every row), else the heads' nodes
    are not drafts. Own confidence (each node's probability given its parent's, for dynamic trees):
    the heads' softmax probability, a recycled candidate's stored one (x ROW_CONFIDENCE), a
    grafted lookup token's prior for its matched n."""
    ms: HTState = state.method_state
    tree, slots = self._tree_and_slots
    B, T = state.batch_size, tree.size
    slots_T, depth = np.maximum(np.asarray(slots), 0), tree.depth
    heads_T = self._from_heads(depth)
    m = int(max(slots_T[heads_T])) + 1 if heads_T.any() else 1
    ok_BxT = jnp.asarray((depth >= 1) & (depth <= self.k))[None, :] & ms.has_h_B[:, None]
    tokens = jnp.zeros((B, T), jnp.int32).at[:, 0].set(last_tokens(state))
    grafted_BxT, context_B = jnp.zeros((B, T), bool), None
    if self.lookup:
      cont_BxL, found_BxL, context_B = main_path_lookup(state, self.lookup, self.max_ngram, self.min_ngram)
      tokens, ok_BxT, grafted_BxT = graft(tokens, ok_BxT, cont_BxL, found_BxL)
    valid = limit((jnp.arange(T)[None, :] == 0) | ok_BxT, context_B, grafted_BxT)
    heads = self._drafting_params(mparams)
    offsets = self.offsets
    pseudo = lambda: pseudo_logits(model, heads, state.cache, ms.h_BxE, self.layer, attn_impl,
                                   pending_B=last_tokens(state), offsets=offsets)
    V = heads["vocab_N"].shape[0] if "vocab_N" in heads else model.config.vocab_size
    # no row verifies a head's draft this step: skip the partial pass (it would make the step dearer)
    wants = valid & jnp.asarray(heads_T)[None, :] & ~grafted_BxT
    needs_heads = jnp.any(wants if wants_heads_B is None else wants & wants_heads_B[:, None])
    logits_BxKxV = jax.lax.cond(needs_heads, pseudo, lambda: jnp.zeros((B, offsets, V), jnp.float32))
    top_p_BxKxM, top_BxKxM = jax.lax.top_k(logits_BxKxV, m)
    top_BxKxM = top_BxKxM.astype(jnp.int32)
    if "vocab_N" in heads:
      top_BxKxM = heads["vocab_N"][top_BxKxM]
    if self.dynamic:  # the drafts' probabilities rank a dynamic tree
      top_p_BxKxM = jnp.exp(top_p_BxKxM - jax.nn.logsumexp(logits_BxKxV, axis=-1, keepdims=True))
    rows, cols = np.clip(depth - 1, 0, offsets - 1), np.minimum(slots_T, m - 1)
    head_tok, own = top_BxKxM[:, rows, cols], top_p_BxKxM[:, rows, cols]  # [B, T]
    ok_BxT = ok_BxT & (needs_heads | ~jnp.asarray(heads_T)[None, :] | grafted_BxT)  # no pass: no head drafts
    if self.recycle and self.root_recycle:  # depth 1: the heads' and the pending token's row's, merged
      first = np.nonzero(depth == 1)[0]
      merged_BxS, ok_BxS, p_BxS = self._merged_depth1(top_BxKxM[:, 0], top_p_BxKxM[:, 0], needs_heads, ms,
                                                     last_tokens(state), int(slots_T[first].max()) + 1)
      head_tok = head_tok.at[:, first].set(merged_BxS[:, slots_T[first]])
      own = own.at[:, first].set(p_BxS[:, slots_T[first]])
      ok_BxT = ok_BxT.at[:, first].set(ok_BxT[:, first] & ok_BxS[:, slots_T[first]])
      valid = valid & (ok_BxT | (jnp.arange(T)[None, :] == 0) | grafted_BxT)
    keep_BxT = grafted_BxT | (jnp.arange(T) == 0)[None, :]
    tokens = jnp.where(keep_BxT, tokens, head_tok)
    if self.recycle:  # depths >= 2 off the matrix (children read their parent's token)
      tokens, valid = fill_from_matrix(tokens, valid, keep_BxT, ms.M_Vxk, ms.seen_V, tree, slots, 2)
    if not self.dynamic:
      return tokens, valid, context_B, None
    parents = np.maximum(np.asarray(tree.parents), 0)
    recycled = ms.P_Vxk[tokens[:, parents], slots_T[None, :]] * ROW_CONFIDENCE  # [B, T]
    own = jnp.where(jnp.asarray(depth >= 2)[None, :], recycled, own)
    contexts = range(num_contexts(self.lookup, self.max_ngram))
    prior_CxL = np.asarray([prior_accept(n, max(self.lookup, 1)) for n in contexts], np.float32)
    if self.lookup:
      lookup_own = jnp.asarray(prior_CxL)[context_B][:, np.clip(depth - 1, 0, self.lookup - 1)]
      own = jnp.where(grafted_BxT, lookup_own, own)
    return tokens, valid, context_B, own.at[:, 0].set(1.0)

  def _propose_dynamic(self, model, mparams, state: DecodeState, attn_impl) -> Draft:
    """Each row's `nodes` most probable pool nodes (`dynamic`), most probable first (a node's
    probability is at most its parent's, so every prefix is a tree), then the prefix that pays."""
    ms: HTState = state.method_state
    pool, _ = self._tree_and_slots
    P, N1 = pool.size, self.tree.size
    B = state.batch_size
    # the heads run for rows that verified a draft last step (one that did not drafts from the
    # lookup chain and its recycled rows, and wants the heads again once that pays), unless the
    # loss bound allows no row any draft this step
    sizes, cost = self.forward_sizes, np.atleast_2d(np.asarray(self.step_cost if self.sized else [[1.0]], np.float32))
    can_draft_B = (ms.sizing.ahead_B + 1.0 + ms.sizing.max_loss >= float(cost[:, 1:].min())) if self.sized and \
        len(sizes) > 1 else jnp.ones((B,), bool)
    limit = lambda valid, context_B, grafted: valid & (can_draft_B[:, None] | (jnp.arange(P) == 0)[None, :])
    tokens, valid, context_B, own = self._fill(model, mparams, state, attn_impl, limit,
                                               ms.drafted_B if self.sized else None)
    parents = np.maximum(np.asarray(pool.parents), 0)
    # a sibling repeating an earlier valid sibling's token is dropped; the first keeps the best confidence
    same_BxPxP = ((tokens[:, :, None] == tokens[:, None, :]) & jnp.asarray(parents[:, None] == parents[None, :])[None]
                  & valid[:, None, :] & jnp.asarray(np.arange(P)[:, None] > 0)[None])
    earlier_PxP = np.tril(np.ones((P, P), bool), -1)
    own = jnp.max(jnp.where(same_BxPxP, own[:, None, :], 0.0), axis=2).at[:, 0].set(1.0)
    valid = valid & ~jnp.any(same_BxPxP & earlier_PxP[None], axis=2)
    own = jnp.where(valid, own, 0.0)
    depth = pool.depth
    reach = own
    for d in range(1, pool.max_depth + 1):  # a node's probability: its parent's times its own
      nodes = np.nonzero(depth == d)[0]
      reach = reach.at[:, nodes].set(own[:, nodes] * reach[:, parents[nodes]])
    key_BxP = jnp.where(valid & (reach > 0), reach, -1.0).at[:, 0].set(2.0)
    order_BxP = jnp.argsort(-key_BxP, axis=1, stable=True)  # ties: the pool order, parents first
    pick_BxN = order_BxP[:, :N1]
    rank_BxP = jnp.argsort(order_BxP, axis=1)  # each pool node's place in the order
    take = lambda x: jnp.take_along_axis(x, pick_BxN, axis=1)
    sel_valid = take(valid & (reach > 0))
    sel_parents = jnp.take_along_axis(rank_BxP, jnp.asarray(parents)[pick_BxN], axis=1)
    sel_parents = jnp.where(sel_valid, sel_parents, 0).at[:, 0].set(-1).astype(jnp.int32)
    sel_own = jnp.where(sel_valid, take(own), 0.0)
    if self.sized:
      table = draft_sizing.row_tables(sel_parents, sel_own, self.tree.max_depth)
      sel_valid = self.limit(sel_valid, ms.sizing, context_B, table)
    return Draft(tokens=take(tokens), valid=sel_valid, context=context_B, parents=sel_parents, accept=sel_own)

  def _merged_depth1(self, heads_BxM, heads_p_BxM, heads_ran, ms: HTState, root_B, S: int):
    """([B, S] tokens, [B, S] ok, [B, S] own confidence): the first S distinct candidates of
    `_depth1_order` (the heads' ranks from heads_BxM, usable where the heads ran; the row's from
    M[root], usable only where that row was written); a slot past a row's distinct candidates is
    not ok."""
    row_BxJ, row_ok_B = ms.M_Vxk[root_B], ms.seen_V[root_B]
    row_p_BxJ = (ms.P_Vxk[root_B] * ROW_CONFIDENCE if ms.P_Vxk.shape[1] else jnp.zeros(row_BxJ.shape, jnp.float32))

    def pick(src, c):
      if src == "head":
        return heads_BxM[:, c], jnp.broadcast_to(heads_ran, row_ok_B.shape), heads_p_BxM[:, c]
      return row_BxJ[:, c], row_ok_B, row_p_BxJ[:, c]

    cand = [pick(src, c) for src, c in self._depth1_order if src == "row" or c < heads_BxM.shape[1]]
    tok_BxJ, ok_BxJ, p_BxJ = (jnp.stack([x[i] for x in cand], axis=1) for i in range(3))
    J = tok_BxJ.shape[1]
    earlier_JxJ = jnp.tril(jnp.ones((J, J), bool), -1)  # [j, i]: i comes before j
    dup_BxJ = jnp.any((tok_BxJ[:, :, None] == tok_BxJ[:, None, :]) & ok_BxJ[:, None, :] & earlier_JxJ[None], axis=2)
    keep_BxJ = ok_BxJ & ~dup_BxJ
    order_BxJ = jnp.argsort(jnp.where(keep_BxJ, 0, 1) * J + jnp.arange(J)[None, :], axis=1)  # kept first, in order
    S = min(S, J)
    take = lambda x: jnp.take_along_axis(x, order_BxJ[:, :S], axis=1)
    return take(tok_BxJ), take(keep_BxJ), take(p_BxJ)

  def update(self, ms: HTState, state, draft: Draft, logits_BxTxV, hidden, verdict, n_B):
    """Keep the layer-t residual of each row's last accepted node: the next step's anchor."""
    last_B = jnp.take_along_axis(verdict.path, jnp.maximum(verdict.n - 1, 0)[:, None], axis=1)[:, 0]
    h_BxE = jnp.take_along_axis(hidden[self.layer - 1], last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    active = n_B > 0
    M_Vxk, seen_V, P_Vxk = ms.M_Vxk, ms.seen_V, ms.P_Vxk
    if self.dynamic:
      M_Vxk, seen_V, P_Vxk = recycle(M_Vxk, seen_V, draft, logits_BxTxV, self.forward_sizes, P_Vxk)
    elif self.recycle:
      M_Vxk, seen_V = recycle(M_Vxk, seen_V, draft, logits_BxTxV, self.forward_sizes)
    drafted_B = jnp.where(active, jnp.sum(draft.valid, axis=1) > 1, ms.drafted_B)
    return HTState(h_BxE=jnp.where(active[:, None], h_BxE, ms.h_BxE), has_h_B=ms.has_h_B | active,
                   sizing=self.observe_step(ms.sizing, draft, verdict, n_B), M_Vxk=M_Vxk, seen_V=seen_V, P_Vxk=P_Vxk,
                   drafted_B=drafted_B)
