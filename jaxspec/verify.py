"""Shared verification: which drafted tokens to accept, and the next token.

A draft is a tree of T nodes whose structure (parents, depth) is static per method config
(`TreeSpec`), or chosen per row each step (`Draft.parents`, with static bounds in a
`DynamicTree`: a drafter that grows its tree by draft confidence, EAGLE-2 / DySpec). Node 0 is
the root: the row's pending token, already committed. Node i > 0 proposes `tokens[b, i]` as the
token after its parent. The target forward gives, at every node i, the
distribution of the token that follows node i (`logits[b, i]`).

* Greedy (`sampling.greedy`): accept the deepest root-to-node path whose every token equals the
  target argmax at its parent; then the argmax at the last accepted node (the bonus token).
  Output equals greedy AR.
* Stochastic: multi-draft recursive rejection sampling (SpecInfer / RSD). At node u with target
  p, children are tried in order; child x drawn from q is accepted with probability
  min(1, p(x)/q(x)); on rejection p <- norm(max(0, p - q)). With `without_replacement`, q also
  loses x and is renormalised (drafts drawn without replacement, e.g. Gumbel-top-k). With no
  q (deterministic drafts), q is one-hot at x. When every child is rejected (or u is a leaf),
  the next token is drawn from the current p. The committed sequence is distributed exactly as
  AR sampling from `target_logprobs`.
  The SJD rule is the chain case with each node carrying its own q.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec.sampling import SamplingConfig, target_logprobs, vocab_argmax


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  """Static tree structure. parents[0] = -1; parents[i] < i. Hashable (jit-static)."""

  parents: tuple[int, ...]

  def __post_init__(self):
    p = self.parents
    if not p or p[0] != -1 or any(not (0 <= p[i] < i) for i in range(1, len(p))):
      raise ValueError(f"parents must start with -1 and satisfy 0 <= parents[i] < i, got {p}")

  @property
  def size(self) -> int:
    return len(self.parents)

  @property
  def depth(self) -> np.ndarray:
    d = np.zeros(self.size, np.int32)
    for i in range(1, self.size):
      d[i] = d[self.parents[i]] + 1
    return d

  @property
  def max_depth(self) -> int:
    return int(self.depth.max())

  @property
  def children(self) -> np.ndarray:
    """[T, C] child node ids in order, -1 padded (C = max children, at least 1)."""
    kids = [[] for _ in range(self.size)]
    for i in range(1, self.size):
      kids[self.parents[i]].append(i)
    C = max(1, max(len(k) for k in kids))
    out = np.full((self.size, C), -1, np.int32)
    for i, k in enumerate(kids):
      out[i, : len(k)] = k
    return out

  @property
  def mask(self) -> np.ndarray:
    """[T, T] ancestor-or-self attention mask."""
    m = np.eye(self.size, dtype=bool)
    for i in range(1, self.size):
      m[i] |= m[self.parents[i]]
    return m

  @property
  def is_chain(self) -> bool:
    return all(self.parents[i] == i - 1 for i in range(1, self.size))

  @staticmethod
  def chain(k: int) -> "TreeSpec":
    """Root plus a chain of k drafted tokens."""
    return TreeSpec(tuple([-1] + list(range(k))))


@struct.dataclass
class Draft:
  tokens: jax.Array  # [B, T] int32; column 0 is the pending token
  valid: jax.Array  # [B, T] bool; invalid nodes are never accepted (ragged drafts)
  q_probs: Optional[jax.Array] = None  # [B, T, V] distribution node i was drawn from; None = deterministic
  context: Any = None  # what the proposer's own verify/update read from propose time (pld: [B] n-gram length)
  parents: Optional[jax.Array] = None  # [B, T] int32: each row's own tree this step (DynamicTree); None: static
  accept: Optional[jax.Array] = None  # [B, T] float32: with `parents`, each node's confidence given its parent's


@struct.dataclass
class Verdict:
  path: jax.Array  # [B, D+1] node ids root..last accepted (garbage past n)
  n: jax.Array  # [B] accepted drafts + 1: tokens to commit (and K/V slots to keep)
  tokens: jax.Array  # [B, D+1] committed tokens: accepted drafts then the next token
  keep: Optional[jax.Array] = None  # [B] forward slots whose K/V the cache keeps (None: n; LUD's lossy mode: fewer)


@struct.dataclass
class TargetRows:
  """What a step computed from the target logits over the rows its forward ran, so the verifier
  does no per-row work over the vocabulary for rows that were not run (rows past them hold zeros
  and are never read: those nodes are invalid). Greedy: the argmax; sampling: the target
  distribution p (`target_logprobs`, exponentiated)."""
  argmax_BxT: Optional[jax.Array] = None  # [B, T] int32
  probs_BxTxV: Optional[jax.Array] = None  # [B, T, V]


def target_rows(logits_BxTxV: jax.Array, sampling: SamplingConfig) -> TargetRows:
  """The TargetRows of these logits (all their rows)."""
  if sampling.greedy:
    return TargetRows(argmax_BxT=vocab_argmax(logits_BxTxV))
  return TargetRows(probs_BxTxV=jnp.exp(target_logprobs(logits_BxTxV, sampling)))


def _target_probs(logits_BxTxV, T: int, sampling: SamplingConfig, target: Optional[TargetRows]) -> jax.Array:
  """[B, T, V] target p of the first T rows: the step's, or computed here."""
  if target is not None and target.probs_BxTxV is not None:
    return target.probs_BxTxV[:, :T]
  return jnp.exp(target_logprobs(logits_BxTxV[:, :T], sampling))


@dataclasses.dataclass(frozen=True)
class DynamicTree:
  """A draft tree each row chooses per step (`Draft.parents`): only its bounds are static
  (hashable, jit-static). Node 0 is the root; a row's parents[i] < i."""

  size: int
  max_depth: int
  max_children: int

  @property
  def is_chain(self) -> bool:
    return False


def tree_structure(parents_BxT: jax.Array, max_depth: int) -> tuple[jax.Array, jax.Array]:
  """(depth [B, T] int32, ancestor-or-self mask [B, T, T]) of per-row trees (parents[:, 0] is
  ignored: node 0 is the root)."""
  B, T = parents_BxT.shape
  parents = jnp.maximum(parents_BxT, 0).astype(jnp.int32)
  not_root = jnp.arange(T)[None, :] > 0
  depth = jnp.zeros((B, T), jnp.int32)
  mask = jnp.broadcast_to(jnp.eye(T, dtype=bool), (B, T, T))
  for _ in range(max_depth):  # a fixed point after max_depth rounds (parents come first)
    depth = jnp.where(not_root, jnp.take_along_axis(depth, parents, axis=1) + 1, 0)
    from_parent = jnp.take_along_axis(mask, parents[:, :, None], axis=1) & not_root[:, :, None]
    mask = jnp.eye(T, dtype=bool)[None] | from_parent
  return depth, mask


def _structure(tree, draft: Draft):
  """(parents [B, T], depth [B, T], children [B, T, C], max depth): the draft's own tree when it
  carries one (`Draft.parents`, bounds from a `DynamicTree`), else the static tree's."""
  B, T = draft.tokens.shape[0], tree.size
  if draft.parents is None:
    bcast = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.int32), (B,) + np.shape(a))
    return (bcast(np.maximum(np.asarray(tree.parents), 0)), bcast(tree.depth), bcast(tree.children),
            tree.max_depth)
  parents = jnp.maximum(draft.parents[:, :T], 0).astype(jnp.int32)
  depth, _ = tree_structure(parents, tree.max_depth)
  idx = jnp.arange(T, dtype=jnp.int32)
  is_child_BxUxI = (parents[:, None, :] == idx[None, :, None]) & (idx > 0)[None, None, :]
  order = jnp.argsort(jnp.where(is_child_BxUxI, idx, T + idx), axis=2)[:, :, : tree.max_children]
  children = jnp.where(jnp.take_along_axis(is_child_BxUxI, order, axis=2), order, -1).astype(jnp.int32)
  return parents, depth, children, tree.max_depth


def _ancestors_path(parents_BxT: jax.Array, depth_BxT: jax.Array, D: int, last_B: jax.Array) -> jax.Array:
  """[B, D+1] path root..last (padded by repeating last)."""
  # Walk up from `last`: node at depth d along the path.
  nodes = [last_B]
  for _ in range(D):
    nodes.append(jnp.take_along_axis(parents_BxT, nodes[-1][:, None], axis=1)[:, 0])
  up_BxD1 = jnp.stack(nodes, axis=1)  # up[b, j] = j-th ancestor of last
  d_B = jnp.take_along_axis(depth_BxT, last_B[:, None], axis=1)[:, 0]
  j_D1 = jnp.arange(D + 1)
  # path[b, i] = ancestor at depth i = up[b, d - i] for i <= d
  idx_BxD1 = jnp.clip(d_B[:, None] - j_D1[None, :], 0, D)
  path = jnp.take_along_axis(up_BxD1, idx_BxD1, axis=1)
  return jnp.where(j_D1[None, :] <= d_B[:, None], path, last_B[:, None])


def verify_greedy(tree, draft: Draft, logits_BxTxV: jax.Array,
                  target: Optional[TargetRows] = None) -> Verdict:
  """Deepest path of argmax matches, plus the argmax bonus. Ties: the lowest node id.
  `target`: the step's argmax, when it has it (read at valid nodes only). `tree`: a TreeSpec, or
  a DynamicTree when the draft carries its own parents."""
  T = tree.size
  have = target is not None and target.argmax_BxT is not None
  argmax_BxT = target.argmax_BxT[:, :T] if have else vocab_argmax(logits_BxTxV[:, :T])
  parents, depth, _, D = _structure(tree, draft)
  at_parent = lambda x_BxT: jnp.take_along_axis(x_BxT, parents, axis=1)
  match_BxT = (draft.tokens[:, :T] == at_parent(argmax_BxT)) & draft.valid[:, :T]
  match_BxT = match_BxT.at[:, 0].set(True)
  ok = match_BxT
  for _ in range(D):
    ok = ok & at_parent(ok)
  score_BxT = jnp.where(ok, depth, -1)
  last_B = jnp.argmax(score_BxT, axis=1).astype(jnp.int32)
  path = _ancestors_path(parents, depth, D, last_B)
  n_B = jnp.take_along_axis(depth, last_B[:, None], axis=1)[:, 0] + 1
  path_tokens = jnp.take_along_axis(draft.tokens, path, axis=1)  # [B, D+1]
  bonus_B = jnp.take_along_axis(argmax_BxT, last_B[:, None], axis=1)[:, 0]
  # committed tokens: path tokens 1..n-1 then the bonus at index n-1
  shifted = jnp.concatenate([path_tokens[:, 1:], path_tokens[:, -1:]], axis=1)
  idx = jnp.arange(D + 1)[None, :]
  tokens = jnp.where(idx == (n_B - 1)[:, None], bonus_B[:, None], shifted)
  return Verdict(path=path, n=n_B, tokens=tokens)


def _remove_token(p_V, z, x, reject):
  """(p, z) with token x's mass removed where `reject`: the residual after rejecting a
  deterministic draft x (q one-hot at x: max(0, p - q) is p without x). p is kept unnormalised,
  z is its mass: O(1) work, not a pass over the vocabulary per rejected child (a 17-node tree
  paid depth x children such passes every step, drafting or not; experiments/LOG.md, session 15)."""
  px = p_V[x]
  return p_V.at[x].set(jnp.where(reject, 0.0, px)), jnp.where(reject, z - px, z)


def verify_stochastic(tree, draft: Draft, logits_BxTxV: jax.Array, sampling: SamplingConfig,
                      key: jax.Array, without_replacement: bool = False,
                      accept_rule: str = "exact", target: Optional[TargetRows] = None) -> Verdict:
  """Recursive rejection sampling over the tree (see module doc). Lossless for accept_rule="exact".

  accept_rule="naive" (resample from p instead of the residual on rejection) exists only so
  tests can show the statistical test detects a wrong rule. `target`: the step's p, when it has it.
  """
  B, T = draft.tokens.shape[0], tree.size
  _, _, children_BxTxC, D = _structure(tree, draft)
  C = children_BxTxC.shape[2]
  p_all_BxTxV = _target_probs(logits_BxTxV, T, sampling, target)
  keys = jax.random.split(key, B)

  def row(p_TxV, toks_T, valid_T, children, q_TxV, k):
    def level(carry, level_key):
      u, alive, p, z, n_acc, acc_path = carry  # p: the current target, unnormalised (mass z)
      kids = children[u]  # [C]
      q = q_TxV[jnp.maximum(kids[0], 0)] if q_TxV is not None else None
      accepted_child = jnp.int32(-1)
      ks = jax.random.split(level_key, C)
      for j in range(C):
        c = kids[j]
        usable = alive & (accepted_child < 0) & (c >= 0) & valid_T[jnp.maximum(c, 0)]
        x = toks_T[jnp.maximum(c, 0)]
        qx = q[x] if q is not None else 1.0
        ratio = jnp.where(qx > 0, p[x] / jnp.maximum(z, 1e-30) / jnp.where(qx > 0, qx, 1.0), 0.0)
        accept = usable & (jax.random.uniform(ks[j]) < ratio)
        reject = usable & ~accept
        accepted_child = jnp.where(accept, c, accepted_child)
        # residual after rejecting x ("naive": deliberately wrong, ignores what the draft covered)
        if accept_rule == "exact" and q is None:  # a deterministic x: p without x
          p, z = _remove_token(p, z, x, reject)
        elif accept_rule == "exact":
          resid = jnp.maximum(p / jnp.maximum(z, 1e-30) - q, 0.0)
          p, z = jnp.where(reject, resid, p), jnp.where(reject, resid.sum(), z)
        if q is not None and without_replacement:
          q_new = q.at[x].set(0.0)
          q_new = q_new / jnp.maximum(q_new.sum(), 1e-30)
          q = jnp.where(reject, q_new, q)
      moved = accepted_child >= 0
      u_new = jnp.where(moved, accepted_child, u)
      p = jnp.where(moved, p_TxV[jnp.maximum(accepted_child, 0)], p)
      z = jnp.where(moved, 1.0, z)
      acc_path = acc_path.at[n_acc + 1].set(jnp.where(moved, accepted_child, acc_path[n_acc + 1]))
      n_acc = n_acc + moved.astype(jnp.int32)
      return (u_new, alive & moved, p, z, n_acc, acc_path), moved

    k_levels, k_final = jax.random.split(k)
    init = (jnp.int32(0), jnp.bool_(True), p_TxV[0], jnp.float32(1.0), jnp.int32(0), jnp.zeros((D + 1,), jnp.int32))
    (u, _, p, _, n_acc, acc_path), moved_D = jax.lax.scan(level, init, jax.random.split(k_levels, D))
    nxt = jax.random.categorical(k_final, jnp.log(jnp.maximum(p, 0.0)))
    path_tokens = toks_T[acc_path]
    shifted = jnp.concatenate([path_tokens[1:], path_tokens[-1:]])
    idx = jnp.arange(D + 1)
    tokens = jnp.where(idx == n_acc, nxt.astype(jnp.int32), shifted)
    path = jnp.where(idx <= n_acc, acc_path, u)
    return path, n_acc + 1, tokens, moved_D

  args = (p_all_BxTxV, draft.tokens[:, :T], draft.valid[:, :T], children_BxTxC)
  if draft.q_probs is not None:
    path, n, tokens, moved = jax.vmap(row)(*args, draft.q_probs[:, :T], keys)
  else:
    path, n, tokens, moved = jax.vmap(lambda p, t, v, c, k: row(p, t, v, c, None, k))(*args, keys)
  return Verdict(path=path, n=n, tokens=tokens)


def verify(tree, draft: Draft, logits_BxTxV: jax.Array, sampling: SamplingConfig, key: jax.Array,
           without_replacement: bool = False, target: Optional[TargetRows] = None) -> Verdict:
  """Greedy or lossless stochastic verification, by `sampling`. `target`: what the step already
  computed from the logits (`TargetRows`; None: computed here from all rows)."""
  if sampling.greedy:
    return verify_greedy(tree, draft, logits_BxTxV, target)
  return verify_stochastic(tree, draft, logits_BxTxV, sampling, key, without_replacement, target=target)


def verify_candidates_trie(nodes_GxK: np.ndarray, draft: Draft, logits_BxTxV, sampling, key,
                           accept_rule: str = "exact", target: Optional[TargetRows] = None) -> Verdict:
  """Lossless verification of G deterministic chain candidates that may share prefixes.

  Treats the candidates as a trie: at depth d the candidates still matching the accepted prefix
  propose their token; each distinct token x is accepted with probability p(x) (p the target at
  the accepted prefix, reduced by earlier rejections); on rejection p(x) <- 0, renormalise (a
  repeated token then has probability 0). The token after the accepted prefix is drawn from the
  remaining p. The committed sequence is distributed exactly as AR sampling.
  `accept_rule="naive"` (keep p on rejection) is wrong on purpose: tests inject it to show the
  statistical test detects a wrong rule. `target`: the step's p, when it has it.
  """
  G, K = nodes_GxK.shape
  T = 1 + G * K
  nodes = jnp.asarray(nodes_GxK, jnp.int32)
  p_all_BxTxV = _target_probs(logits_BxTxV, T, sampling, target)
  keys = jax.random.split(key, draft.tokens.shape[0])

  def row(p_TxV, toks_T, valid_T, k):
    toks_GxK, ok_GxK = toks_T[nodes], valid_T[nodes]

    def level(carry, inp):
      d, lkey = inp
      alive_G, p_V, z, n_acc, stopped, last_g = carry  # p_V unnormalised, mass z
      us = jax.random.uniform(lkey, (G,))
      acc_g = jnp.int32(-1)
      for g in range(G):
        x = toks_GxK[g, d]
        usable = ~stopped & alive_G[g] & ok_GxK[g, d] & (acc_g < 0)
        accept = usable & (us[g] < p_V[x] / jnp.maximum(z, 1e-30))
        reject = usable & ~accept
        acc_g = jnp.where(accept, g, acc_g)
        if accept_rule == "exact":
          p_V, z = _remove_token(p_V, z, x, reject)
      moved = acc_g >= 0
      g_acc = jnp.maximum(acc_g, 0)
      x_acc = toks_GxK[g_acc, d]
      alive_G = jnp.where(moved, alive_G & ok_GxK[:, d] & (toks_GxK[:, d] == x_acc), alive_G)
      p_V, z = jnp.where(moved, p_TxV[nodes[g_acc, d]], p_V), jnp.where(moved, 1.0, z)
      carry = (alive_G, p_V, z, n_acc + moved.astype(jnp.int32), stopped | ~moved, jnp.where(moved, acc_g, last_g))
      return carry, moved

    k_levels, k_final = jax.random.split(k)
    init = (jnp.ones((G,), bool), p_TxV[0], jnp.float32(1.0), jnp.int32(0), jnp.bool_(False), jnp.int32(0))
    (_, p_V, _, n_acc, _, last_g), moved_K = jax.lax.scan(
        level, init, (jnp.arange(K), jax.random.split(k_levels, K)))
    nxt = jax.random.categorical(k_final, jnp.log(jnp.maximum(p_V, 0.0))).astype(jnp.int32)
    idx = jnp.arange(K + 1)
    chain_nodes = jnp.concatenate([jnp.zeros((1,), jnp.int32), nodes[last_g]])  # root, then g's chain
    last_node = chain_nodes[n_acc]
    path = jnp.where(idx <= n_acc, chain_nodes, last_node)
    chain_toks = jnp.concatenate([toks_GxK[last_g], toks_GxK[last_g, -1:]])
    tokens = jnp.where(idx == n_acc, nxt, chain_toks)
    return path, n_acc + 1, tokens, moved_K

  path, n, tokens, moved = jax.vmap(row)(p_all_BxTxV, draft.tokens[:, :T], draft.valid[:, :T], keys)
  return Verdict(path=path, n=n, tokens=tokens)
