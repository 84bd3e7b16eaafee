"""Sharding over a device mesh: tensor parallel over `model`, data parallel over `data`.

Every parameter carries logical axis names (`logical_axes` metadata: "vocab", "embed", "heads",
"kv_heads", "mlp"); the KV cache has CACHE_AXES ("batch", "kv_heads", "length", "head_dim") and
the decode state's per-row arrays have "batch". One `ShardingRules` object maps logical axes to
mesh axes; changing the parallelism layout is editing those rules, nothing else:

    mesh = jaxspec.sharding.make_mesh(data=2, model=4)          # or mesh_from_spec("data=2,model=4")
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

Mesh axes are `AxisType.Auto`: shardings are fixed at the boundaries (parameters and decode
state committed to theirs, the jitted steps' out_shardings equal to the state's) and XLA
propagates them through the unannotated model.
Pallas attention kernels (custom calls XLA cannot partition) run under `shard_map` over the
batch and kv-head axes.

Multi-host: `initialize_distributed()` (called by `make_mesh`, the CLI's `--distributed`, or
JAXSPEC_DISTRIBUTED=1) runs `jax.distributed.initialize()`. Every process runs the same program
with the same prompts; arrays are created with each process materializing only its shards, and
`to_host` gathers the sharded token buffer for reading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxspec.errors import InvalidOptionError
from jaxspec.models.kv_cache import CACHE_AXES, KVCache

MESH_AXES = ("data", "model")

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
# Mesh


def initialize_distributed(enable: bool | None = None) -> bool:
  """Run `jax.distributed.initialize()` when asked (enable=True, or env JAXSPEC_DISTRIBUTED=1).

  Coordinator, process count and id come from the cluster (Cloud TPU, SLURM, ... are detected
  by JAX) or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Must run before
  any other JAX call. Returns whether JAX runs distributed. Idempotent.
  """
  if enable is None:
    enable = os.environ.get("JAXSPEC_DISTRIBUTED", "").lower() in ("1", "true", "yes")
  if not enable:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process only
  jax.distributed.initialize(**kwargs)
  return True


def parse_mesh(text: str) -> dict[str, int]:
  """"data=2,model=4" (or "2x4", data x model) -> {"data": 2, "model": 4}. Either axis may be
  left out ("model=8"): make_mesh fills it with the remaining devices."""
  text = text.strip().lower()
  out: dict[str, int] = {}
  try:
    if "=" not in text:
      data, model = text.split("x")
      out = {"data": int(data), "model": int(model)}
    else:
      for part in text.split(","):
        name, value = (s.strip() for s in part.split("="))
        if name not in MESH_AXES or name in out:
          raise ValueError(name)
        out[name] = int(value)
  except ValueError:
    raise InvalidOptionError(f"bad mesh {text!r}; write it as data=2,model=4 (or 2x4)") from None
  if any(v < 1 for v in out.values()):
    raise InvalidOptionError(f"mesh axis sizes must be >= 1, got {text!r}; e.g. data=2,model=4")
  return out


def make_mesh(data: int | None = None, model: int | None = None, *, devices=None,
              axis_types: str = "auto") -> Mesh:
  """A ("data", "model") mesh. Missing sizes take the remaining devices (both missing: all
  devices on `model`). On one host a mesh smaller than the device count uses the first devices.

  axis_types="auto" (default) lets XLA propagate the boundary shardings through the model;
  "explicit" gives sharding-in-types meshes (the model code does not annotate for those).
  """
  initialize_distributed()
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data is None and model is None:
    data, model = 1, n
  elif data is None:
    data = max(n // model, 1)
  elif model is None:
    model = max(n // data, 1)
  if data * model > n or (data * model < n and jax.process_count() > 1):
    raise InvalidOptionError(f"mesh data={data},model={model} needs {data * model} devices, "
                             f"{n} available; pick sizes whose product is {n}")
  kinds = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
  if axis_types not in kinds:
    raise InvalidOptionError(f"axis_types must be 'auto' or 'explicit', got {axis_types!r}")
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(kinds[axis_types],) * 2,
                       devices=devices[: data * model])


def mesh_from_spec(text: str | None, **kwargs) -> Mesh | None:
  """make_mesh(**parse_mesh(text)); None for None/"" (single device). For CLIs and harnesses."""
  return make_mesh(**parse_mesh(text), **kwargs) if text else None


def mesh_name(mesh: Mesh) -> str:
  return ",".join(f"{k}={v}" for k, v in mesh.shape.items())


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


def shard_params(params, mesh: Mesh, rules: ShardingRules | None = None, config=None):
  """`params` moved onto their shardings (on every process; values must agree across hosts)."""
  return jax.device_put(params, param_shardings(params, mesh, rules, config))


def shard_bundle(bundle, mesh: Mesh, rules: ShardingRules | None = None):
  """A copy of `bundle` whose params live on `mesh`; generate/stream then decode on it."""
  rules = rules or DEFAULT_RULES
  return dataclasses.replace(bundle, params=shard_params(bundle.params, mesh, rules, bundle.config),
                             mesh=mesh, rules=rules, method_memory={})  # memory is per device layout


def sharding_loader(mesh: Mesh, rules: ShardingRules | None = None):
  """The `shardings` callback for `hf_loader.load_decoder`: (config, abstract params) ->
  per-parameter NamedSharding; the loader then reads only each device's slice."""
  return lambda config, abstract: param_shardings(abstract, mesh, rules, config)


# ---------------------------------------------------------------------------------------------
# Decode state and cache

# Logical axes of DecodeState fields (the cache and method_state are handled separately).
def _named(mesh, rules, axes, x) -> NamedSharding:
  shape = jnp.shape(x)
  if axes is None or len(axes) != len(shape):
    axes = (None,) * len(shape)
  return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def cache_shardings(cache: KVCache, mesh: Mesh, rules: ShardingRules):
  """KVCache of NamedSharding, from the logical axes its fields declare."""
  out = {}
  for f in dataclasses.fields(cache):
    axes = f.metadata.get("axes")
    out[f.name] = jax.tree.map(functools.partial(_named, mesh, rules, axes), getattr(cache, f.name))
  return cache.replace(**out)


def _method_state_shardings(method_state, mesh, rules, method):
  axes_tree = method.method_state_axes(method_state) if method is not None else None
  if axes_tree is not None:  # a method may name its state's logical axes (a matching tree of tuples)
    return jax.tree.map(lambda axes, x: _named(mesh, rules, axes, x), axes_tree, method_state,
                        is_leaf=lambda a: a is None or isinstance(a, tuple))
  # KV caches inside (e.g. a draft model's) are sharded like the target's; the rest replicated.
  return jax.tree.map(
      lambda x: cache_shardings(x, mesh, rules) if isinstance(x, KVCache) else _named(mesh, rules, None, x),
      method_state, is_leaf=lambda x: isinstance(x, KVCache))


def state_shardings(state, mesh: Mesh, rules: ShardingRules, method=None):
  """A DecodeState of NamedSharding for `state` (concrete or abstract) under resolved `rules`.

  Each field by the logical axes it declares (`metadata["axes"]`, see DecodeState and KVCache),
  method state per the method's `method_state_axes(method_state)` if it has one (else
  replicated, KV caches inside sharded), anything without axes replicated.
  """
  out = {}
  for f in dataclasses.fields(state):
    value = getattr(state, f.name)
    if isinstance(value, KVCache):
      out[f.name] = cache_shardings(value, mesh, rules)
    elif f.name == "method_state":
      out[f.name] = _method_state_shardings(value, mesh, rules, method)
    else:
      out[f.name] = jax.tree.map(functools.partial(_named, mesh, rules, f.metadata.get("axes")), value)
  return state.replace(**out)


def put(x, sharding):
  """device_put that also works across processes (each process provides its shards)."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_state(state, mesh: Mesh, rules: ShardingRules | None = None, method=None, config=None):
  """Move an existing DecodeState onto the mesh (init_state_sharded avoids the unsharded copy)."""
  rules = resolve_rules(rules, mesh, config)
  return jax.tree.map(put, state, state_shardings(state, mesh, rules, method))


def to_host(x) -> np.ndarray:
  """np.asarray that also works for arrays sharded across processes (gathers them)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Layout: what generate/stream need to decode on a mesh


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh plus rules resolved for one model's sizes (hashable: part of jit cache keys)."""

  mesh: Mesh
  rules: ShardingRules

  def spec(self, axes, shape=None) -> P:
    return logical_to_spec(axes, self.rules, self.mesh, shape)


def layout_for(bundle, mesh: Mesh | None = None, rules: ShardingRules | None = None) -> Layout | None:
  """The layout a call decodes with: explicit mesh/rules, else the bundle's; None = unsharded."""
  mesh = mesh if mesh is not None else getattr(bundle, "mesh", None)
  if mesh is None:
    return None
  rules = rules or getattr(bundle, "rules", None) or DEFAULT_RULES
  return Layout(mesh, resolve_rules(rules, mesh, bundle.config))


_ACTIVE = threading.local()


@contextlib.contextmanager
def active_layout(layout: Layout | None):
  """While tracing under this, Pallas attention is wrapped in shard_map for `layout`."""
  prev = getattr(_ACTIVE, "layout", None)
  _ACTIVE.layout = layout
  try:
    yield
  finally:
    _ACTIVE.layout = prev


def current_layout() -> Layout | None:
  return getattr(_ACTIVE, "layout", None)


def partition_attention(kernel: Callable, q_BxTxHxD, k_cache_BxKxSxD, v_cache_BxKxSxD, lengths_B,
                        tree_mask_TxT):
  """Run an attention kernel per shard (batch over the batch axis, kv heads over the kv_heads
  axis when both H and K divide it) under the active layout; plain call when none is active."""
  layout = current_layout()
  if layout is None:
    return kernel(q_BxTxHxD, k_cache_BxKxSxD, v_cache_BxKxSxD, lengths_B, tree_mask_TxT)
  B, _, H, _ = q_BxTxHxD.shape
  K = k_cache_BxKxSxD.shape[1]
  b = layout.spec(("batch",), (B,))[0]
  h = layout.spec(("kv_heads",), (K,))[0]
  if h is not None and H % _axis_size(layout.mesh, (h,) if isinstance(h, str) else h):
    h = None
  q_spec, c_spec = P(b, None, h, None), P(b, h, None, None)
  return jax.shard_map(kernel, mesh=layout.mesh, in_specs=(q_spec, c_spec, c_spec, P(b), P()),
                       out_specs=q_spec, check_vma=False)(
                           q_BxTxHxD, k_cache_BxKxSxD, v_cache_BxKxSxD, lengths_B, tree_mask_TxT)


def _traced_under(fn, layout: Layout):
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with active_layout(layout):
      return fn(*args, **kwargs)
  return wrapped


def _static_names(fn) -> tuple[str, ...]:
  """Keyword-only parameters of an engine function are its static (jit) arguments."""
  return tuple(n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY)


def state_initializer(bundle, mesh: Mesh | None = None, rules: ShardingRules | None = None):
  """engine.init_state's drop-in for this call: unchanged when unsharded, else one that builds
  the state directly on the mesh (each device allocates only its cache shard)."""
  from jaxspec import engine
  layout = layout_for(bundle, mesh, rules)
  if layout is None:
    return engine.init_state

  def init(config, prompts, max_new_tokens, method, key, num_slots, max_steps, cache_dtype):
    fn = lambda key: engine.init_state(config, prompts, max_new_tokens, method, key, num_slots,
                                       max_steps, cache_dtype)
    shardings = state_shardings(jax.eval_shape(fn, key), layout.mesh, layout.rules, method)
    return jax.jit(fn, out_shardings=shardings)(key)

  return init


_FNS: dict[Any, tuple] = {}


def _sharding_signature(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(x.sharding for x in leaves)


def params_for(bundle, layout: Layout):
  """The bundle's params on `layout` (moved there when they live elsewhere)."""
  target = param_shardings(bundle.params, layout.mesh, layout.rules)
  ok = all(_on(x, s) for x, s in zip(jax.tree.leaves(bundle.params), jax.tree.leaves(target)))
  return bundle.params if ok else jax.device_put(bundle.params, target)


def decode_fns(bundle, state, mesh: Mesh | None = None, rules: ShardingRules | None = None,
               method=None):
  """(params, state, prefill_jit, run_steps_jit) for one generate/stream call.

  Unsharded (no mesh given, none on the bundle): everything as it is, engine's jitted functions.
  Sharded: params and state committed to their shardings (leaves elsewhere, e.g. method memory
  from an earlier call, are moved), prefill/run_steps jitted with out_shardings equal to the
  state's input shardings (the loop never reshards) and the state (cache included) donated.
  """
  from jaxspec import engine
  layout = layout_for(bundle, mesh, rules)
  if layout is None:
    return bundle.params, state, engine.prefill_jit, engine.run_steps_jit
  params = params_for(bundle, layout)
  target = state_shardings(state, layout.mesh, layout.rules, method)
  state = jax.tree.map(lambda x, s: x if _on(x, s) else put(x, s), state, target)
  key = (layout, _sharding_signature(params), _sharding_signature(state))
  if key not in _FNS:
    # Input shardings are the arguments' own (jit takes no in_shardings with static kwargs):
    # params and state are committed to theirs above; out_shardings pins the state's.
    s_sh = jax.tree.map(lambda x: x.sharding, state)
    mk = lambda fn: jax.jit(_traced_under(fn, layout), out_shardings=s_sh,
                            static_argnames=_static_names(fn), donate_argnames=("state",))
    _FNS[key] = (mk(engine.prefill), mk(engine.run_steps))
  return (params, state) + _FNS[key]


def method_params_for(mparams, bundle, mesh: Mesh | None = None, rules: ShardingRules | None = None):
  """A method's own parameters (a drafter's weights, trained heads) on the call's mesh, split by
  their logical axes (sizes checked per dimension); unchanged when unsharded or None. Moved on
  every call unless already there: shard them once for repeated use."""
  layout = layout_for(bundle, mesh, rules)
  if layout is None or mparams is None:
    return mparams
  raw = rules or getattr(bundle, "rules", None) or DEFAULT_RULES
  target = param_shardings(mparams, layout.mesh, raw)
  ok = all(_on(x, t) for x, t in zip(jax.tree.leaves(mparams), jax.tree.leaves(target)))
  return mparams if ok else jax.device_put(mparams, target)


def _on(x, sharding) -> bool:
  return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim)


# ---------------------------------------------------------------------------------------------
# Checkpoints (orbax)


def save_params(path: str | Path, params) -> None:
  """Write (possibly sharded) params as an orbax checkpoint; every process writes its shards."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(Path(path).absolute(), params)


def restore_params(path: str | Path, abstract_params, mesh: Mesh, rules: ShardingRules | None = None,
                   config=None):
  """Restore an orbax params checkpoint straight onto `mesh` under `rules`, whatever mesh it was
  saved from. `abstract_params`: e.g. `nnx.split(nnx.eval_shape(lambda: Decoder(config)))[1]`
  or the `params` of any bundle of the same model."""
  import orbax.checkpoint as ocp
  shardings = param_shardings(abstract_params, mesh, rules, config)
  target = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                        abstract_params, shardings, is_leaf=_is_var)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(path).absolute(), target)
