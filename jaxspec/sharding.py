"""Sharding over a device mesh: tensor parallel over `model`, data parallel over `data`.

Arrays declare their logical axes where they are declared: parameters in `logical_axes`
metadata ("vocab", "embed", "heads", "kv_heads", "mlp"), DecodeState and KVCache fields in
their field metadata, method state through `Method.method_state_axes`. One `ShardingRules`
object maps logical axes to mesh axes; changing the parallelism layout is editing those rules:

    mesh = jaxspec.mesh.make_mesh(data=2, model=4)
    bundle = jaxspec.load_model("smollm2-135m-instruct", mesh=mesh)   # params read shard by shard
    out = jaxspec.generate(bundle, prompts)                      # state, cache, steps on the mesh

Sizes that do not divide their mesh axis are replicated, never padded:
  * a logical axis whose model-wide size (heads H, kv heads K, mlp F, vocab V, batch B) is not a
    multiple of its mesh axis size is replicated over that axis;
  * query heads follow the KV heads: if K does not divide the `model` axis (SmolLM2's 3 KV heads
    on 2, 4 or 8 devices), the attention projections and the cache are replicated over `model`
    (attention runs replicated; MLP and vocab stay sharded), so a head group never straddles
    devices;
  * a batch that does not divide the `data` axis is replicated over `data` (every data group
    decodes all rows: correct, no speedup). Pass a batch that is a multiple of the data axis.

Mesh axes are `AxisType.Auto`. A `Layout` (mesh + resolved rules, hashable) is a static
argument of the engine's prefill and loop: they pin the decode state to its shardings
(`pin_state`), XLA propagates them through the unannotated model, and the Pallas attention
kernels (custom calls XLA cannot partition) get the mesh explicitly (`Layout.attention`).

Multi-host (see jaxspec.mesh): every process runs the same program with the same prompts;
arrays are created with each process materializing only its shards (`put`), and `to_host`
gathers a sharded array for reading.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxspec.kernels import AttentionImpl
from jaxspec.models.kv_cache import KVCache

MeshAxis = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis -> mesh axis (a name, a tuple of names, or None = replicated).

  Defaults: tensor parallel over `model` (heads, kv_heads, mlp, vocab), batch over `data`.
  Pure data parallel on 8 devices, for example: ShardingRules(batch=("data", "model"),
  heads=None, kv_heads=None, mlp=None, vocab=None).
  """

  batch: MeshAxis = "data"
  heads: MeshAxis = "model"
  kv_heads: MeshAxis = "model"
  mlp: MeshAxis = "model"
  vocab: MeshAxis = "model"
  embed: MeshAxis = None
  length: MeshAxis = None
  head_dim: MeshAxis = None

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    """The mesh axes `logical` maps to (empty: replicated)."""
    if logical is None:
      return ()
    if not hasattr(self, logical):
      raise ValueError(f"unknown logical axis {logical!r}; ShardingRules knows "
                       f"{[f.name for f in dataclasses.fields(self)]}")
    target = getattr(self, logical)
    if target is None:
      return ()
    return (target,) if isinstance(target, str) else tuple(target)


DEFAULT_RULES = ShardingRules()


# ---------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec


def logical_sizes(config) -> dict[str, int]:
  """Model-wide counts that must divide a mesh axis for that logical axis to be sharded
  (a [E, H*D] projection shards by whole heads, so "heads" counts H, not H*D)."""
  return {"heads": config.num_heads, "kv_heads": config.num_kv_heads, "mlp": config.mlp_dim,
          "vocab": config.vocab_size, "embed": config.embed_dim, "head_dim": config.head_dim}


def _axis_size(mesh, names) -> int:
  return math.prod(mesh.shape[n] for n in names)


def resolve_rules(rules: ShardingRules | None, mesh: Mesh, config=None) -> ShardingRules:
  """`rules` with every axis the mesh lacks, and (given `config`) every model axis whose count
  does not divide its mesh axes, set to None (replicated).

  Query heads are sharded only where a device's heads share their kv heads: with kv heads
  sharded too, or (kv heads replicated) when the heads axis size m is a multiple of K (e.g.
  multi-query attention). SmolLM2 (H=9, K=3) on m=2/4/8: both replicated.
  """
  rules = rules or DEFAULT_RULES
  rules = dataclasses.replace(rules, **{
      f.name: None for f in dataclasses.fields(rules)
      if any(n not in mesh.shape for n in rules.mesh_axes(f.name))})
  if config is None:
    return rules
  rules = dataclasses.replace(rules, **{
      name: None for name, size in logical_sizes(config).items()
      if size % _axis_size(mesh, rules.mesh_axes(name))})
  heads, kv = rules.mesh_axes("heads"), rules.mesh_axes("kv_heads")
  if heads and heads != kv and (kv or _axis_size(mesh, heads) % config.num_kv_heads):
    rules = dataclasses.replace(rules, heads=None)
  return rules


def logical_to_spec(axes, rules: ShardingRules, mesh: Mesh, shape=None) -> P:
  """PartitionSpec for an array with logical `axes`. A mesh axis is used at most once, and a
  dimension that its mesh axes do not divide (given `shape`) is replicated."""
  spec, used = [], set()
  for d, name in enumerate(axes):
    names = tuple(n for n in rules.mesh_axes(name) if n in mesh.shape)
    size = _axis_size(mesh, names)
    if not names or used & set(names) or (shape is not None and shape[d] % size):
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(params, mesh: Mesh, rules: ShardingRules | None = None, config=None):
  """A tree of NamedSharding (a prefix of `params`: one per Variable) from each parameter's
  `logical_axes`. With `config`, heads/kv_heads/mlp/vocab are checked against the model's
  counts (see resolve_rules). Parameters without logical axes are replicated."""
  rules = resolve_rules(rules, mesh, config)

  def one(v):
    axes = v.get_metadata().get("logical_axes") if _is_var(v) else None
    shape = v.shape
    axes = axes if axes is not None else (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))

  return jax.tree.map(one, params, is_leaf=_is_var)


def shard_bundle(bundle, mesh: Mesh, rules: ShardingRules | None = None):
  """A copy of `bundle` whose params live on `mesh`; generate/stream then decode on it."""
  rules = rules or DEFAULT_RULES
  params = jax.device_put(bundle.params, param_shardings(bundle.params, mesh, rules, bundle.config))
  return dataclasses.replace(bundle, params=params, mesh=mesh, rules=rules, huge_pages=False,
                             method_memory={})  # memory is per device layout; XLA owns the copies


def sharding_loader(mesh: Mesh, rules: ShardingRules | None = None):
  """The `shardings` callback for `hf_loader.load_decoder`: (config, abstract params) ->
  per-parameter NamedSharding; the loader then reads only each device's slice."""
  return lambda config, abstract: param_shardings(abstract, mesh, rules, config)


# ---------------------------------------------------------------------------------------------
# Decode state and cache: shardings from the axes their fields declare


def _named(mesh, rules, axes, x) -> NamedSharding:
  shape = jnp.shape(x)
  if axes is None or len(axes) != len(shape):
    axes = (None,) * len(shape)
  return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def _field_shardings(obj, mesh, rules, method):
  """The dataclass `obj` (DecodeState, KVCache) with each field's arrays replaced by the
  NamedSharding its declared `metadata["axes"]` give; KV caches anywhere by their own fields;
  method state by the method's `method_state_axes`."""
  out = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if isinstance(value, KVCache):
      out[f.name] = _field_shardings(value, mesh, rules, method)
    elif f.name == "method_state":
      out[f.name] = _method_state_shardings(value, mesh, rules, method)
    else:
      out[f.name] = jax.tree.map(functools.partial(_named, mesh, rules, f.metadata.get("axes")), value)
  return obj.replace(**out)


def _method_state_shardings(method_state, mesh, rules, method):
  axes_tree = method.method_state_axes(method_state) if method is not None else None
  if axes_tree is not None:  # a matching tree of axis tuples (None leaves: replicated)
    return jax.tree.map(lambda axes, x: _named(mesh, rules, axes, x), axes_tree, method_state,
                        is_leaf=lambda a: a is None or isinstance(a, tuple))
  # KV caches inside (e.g. a draft model's) are sharded like the target's; the rest replicated.
  return jax.tree.map(
      lambda x: _field_shardings(x, mesh, rules, None) if isinstance(x, KVCache) else _named(mesh, rules, None, x),
      method_state, is_leaf=lambda x: isinstance(x, KVCache))


def put(x, sharding):
  """device_put that also works across processes (each process provides its shards)."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x) -> np.ndarray:
  """np.asarray that also works for arrays sharded across processes (gathers them)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Layout: the static description of one call's placement


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh plus rules resolved for one model's sizes (hashable: a static jit argument)."""

  mesh: Mesh
  rules: ShardingRules

  def spec(self, axes, shape=None) -> P:
    return logical_to_spec(axes, self.rules, self.mesh, shape)

  def shardings(self, tree, method=None):
    """`tree` (a DecodeState, a KVCache, or a method's parameters) with every array replaced by
    its NamedSharding under this layout. Works on concrete, abstract or traced values."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
      return _field_shardings(tree, self.mesh, self.rules, method)
    return param_shardings(tree, self.mesh, self.rules)

  def attention(self, name: str) -> AttentionImpl:
    """The tree attention implementation `name` placed on this mesh."""
    axes = lambda logical: (lambda a: a[0] if len(a) == 1 else (a or None))(self.rules.mesh_axes(logical))
    return AttentionImpl(name, self.mesh, axes("batch"), axes("kv_heads"))


def layout_for(bundle, mesh: Mesh | None = None, rules: ShardingRules | None = None) -> Layout | None:
  """The layout a call decodes with: explicit mesh/rules, else the bundle's; None = unsharded."""
  mesh = mesh if mesh is not None else getattr(bundle, "mesh", None)
  if mesh is None:
    return None
  rules = rules or getattr(bundle, "rules", None) or DEFAULT_RULES
  return Layout(mesh, resolve_rules(rules, mesh, bundle.config))


def attention_impl(name: str, layout: Layout | None) -> str | AttentionImpl:
  """What the model's forward gets as `attn_impl`: the name, placed on the layout's mesh."""
  return name if layout is None else layout.attention(name)


def pin_state(state, layout: Layout | None, method=None):
  """Inside a jitted function: constrain the decode state to its layout's shardings (identity
  when unsharded). The engine pins what it returns, so the loop never reshards its carry.
  Without `method` the method state is left as it is (a pass-through keeps its sharding)."""
  if layout is None:
    return state
  pinned = jax.lax.with_sharding_constraint(state, layout.shardings(state, method))
  return pinned if method is not None else pinned.replace(method_state=state.method_state)


def place(tree, layout: Layout | None, method=None):
  """`tree` (params, decode state or method params) committed to its shardings under `layout`;
  leaves already there are not moved. Unchanged when unsharded or None."""
  if layout is None or tree is None:
    return tree
  target = layout.shardings(tree, method)
  if all(_on(x, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(target))):
    return tree
  if dataclasses.is_dataclass(tree):  # decode state: per array, each process its shards
    return jax.tree.map(lambda x, s: x if _on(x, s) else put(x, s), tree, target)
  return jax.device_put(tree, target)  # parameters (a prefix tree of shardings)


def _on(x, sharding) -> bool:
  return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim)


def state_initializer(layout: Layout | None):
  """engine.init_state's drop-in for this call: unchanged when unsharded, else one that builds
  the state directly on the mesh (each device allocates only its cache shard)."""
  from jaxspec import engine
  if layout is None:
    return engine.init_state

  def init(config, prompts, max_new_tokens, method, key, num_slots, max_steps, cache_dtype):
    fn = lambda key: engine.init_state(config, prompts, max_new_tokens, method, key, num_slots,
                                       max_steps, cache_dtype)
    return jax.jit(fn, out_shardings=layout.shardings(jax.eval_shape(fn, key), method))(key)

  return init
