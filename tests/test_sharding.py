"""Sharding over device meshes (jaxspec/sharding.py).

The mesh checks run on 8 simulated CPU devices in subprocesses (this pytest process keeps its
one device): for meshes 1x8, 2x4, 4x2, 8x1, greedy outputs of every method in METHODS equal the
single-device ones, logits agree, params and cache are sharded as the rules say, Pallas
attention runs per shard, an orbax checkpoint restores onto another mesh, a training run
checkpointed on one mesh resumes on another; the real model loads
shard by shard and decodes identically; a 2-process (multi-host) CLI run prints the
single-process text from process 0 only.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import jaxspec
from jaxspec import checkpoint, mesh as jmesh, sharding as shd
from jaxspec.errors import InvalidOptionError
from jaxspec.models.config import ModelConfig
from jaxspec.models.kv_cache import CACHE_AXES

HERE = Path(__file__).resolve().parent
MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]  # B=4
# Tiny models: "kv4" shards its 4 kv heads on model=2/4; "kv3" has 3 kv heads (replicated on
# model>1, like SmolLM2's), qkv bias and tied embeddings.
TINY = {"kv4": dict(heads=8, kv_heads=4, embed=32, seed=1),
        "kv3": dict(heads=6, kv_heads=3, embed=48, qkv_bias=True, tie=True, seed=2)}
NEW_TOKENS = 12


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
  env.update(extra)
  return env


def _start_worker(out: Path, *args: str) -> tuple[subprocess.Popen, Path]:
  """`python tests/test_sharding.py TASK ARGS...` on 8 simulated devices, in the background."""
  proc = subprocess.Popen([sys.executable, __file__, *args, str(out)], env=_env(8), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  return proc, out


def _finish_worker(started, timeout: int = 900) -> dict:
  proc, out = started
  stdout, stderr = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f"worker {proc.args[2:]} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
  return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# In-process (one device): parsing and rules


def test_parse_mesh():
  assert jmesh.parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
  assert jmesh.parse_mesh("model=8") == {"model": 8}
  assert jmesh.parse_mesh("2x4") == {"data": 2, "model": 4}
  for bad in ("data=2,modle=4", "data=two", "data=0", "2x"):
    with pytest.raises(InvalidOptionError, match="data=2,model=4"):
      jmesh.parse_mesh(bad)


def test_mesh_larger_than_devices_is_a_clear_error():
  with pytest.raises(InvalidOptionError, match="devices"):
    jmesh.make_mesh(data=2, model=4)
  assert jmesh.make_mesh().shape == {"data": 1, "model": jax.device_count()}


def test_rules_replicate_what_does_not_divide():
  smollm2 = ModelConfig(vocab_size=49152, embed_dim=576, num_layers=30, num_heads=9, num_kv_heads=3,
                        head_dim=64, mlp_dim=1536)
  for m in (2, 4, 8):
    mesh = AbstractMesh((8 // m, m), jmesh.MESH_AXES)
    r = shd.resolve_rules(shd.DEFAULT_RULES, mesh, smollm2)
    assert (r.heads, r.kv_heads, r.mlp, r.vocab, r.batch) == (None, None, "model", "model", "data")
    assert shd.logical_to_spec(("embed", "heads"), r, mesh, (576, 576)) == P(None, None)
    assert shd.logical_to_spec(("embed", "mlp"), r, mesh, (576, 1536)) == P(None, "model")
    # batch 3 does not divide data=2/4: replicated; batch 8 is split
    if 8 // m > 1:
      assert shd.logical_to_spec(CACHE_AXES, r, mesh, (3, 3, 128, 64)) == P(None, None, None, None)
    assert shd.logical_to_spec(CACHE_AXES, r, mesh, (8, 3, 128, 64)) == P("data", None, None, None)
  # multi-query attention: the one kv head replicated, query heads still split
  mqa = ModelConfig(vocab_size=64, embed_dim=32, num_layers=1, num_heads=8, num_kv_heads=1, head_dim=4, mlp_dim=64)
  r = shd.resolve_rules(None, AbstractMesh((1, 4), jmesh.MESH_AXES), mqa)
  assert (r.heads, r.kv_heads) == ("model", None)
  # changing the layout is editing the rules: pure data parallel over all 8 devices
  dp = shd.ShardingRules(batch=("data", "model"), heads=None, kv_heads=None, mlp=None, vocab=None)
  r = shd.resolve_rules(dp, AbstractMesh((2, 4), jmesh.MESH_AXES), smollm2)
  assert shd.logical_to_spec(CACHE_AXES, r, AbstractMesh((2, 4), jmesh.MESH_AXES), (8, 3, 128, 64)) == \
      P(("data", "model"), None, None, None)
  with pytest.raises(ValueError, match="logical axis"):
    shd.DEFAULT_RULES.mesh_axes("hedas")


# ---------------------------------------------------------------------------------------------
# 8 simulated devices, tiny random models


def _expected_specs(name: str, d: int, m: int) -> dict:
  """Spec and per-device shard shape the default rules must give (see the module docstring of
  jaxspec.sharding): kv heads split iff K % m == 0; query heads follow them (or m % K == 0)."""
  c = TINY[name]
  H, K, E, D, F, V, B = c["heads"], c["kv_heads"], c["embed"], 8, 2 * c["embed"], 64, len(PROMPTS)
  kv = "model" if K % m == 0 else None
  heads = "model" if H % m == 0 and (kv or m % K == 0) else None
  data = "data" if B % d == 0 else None
  div = lambda n, ax, size: n // size if ax else n
  return {
      "q_ExHD": (P(None, heads), (E, div(H * D, heads, m))),
      "k_ExKD": (P(None, kv), (E, div(K * D, kv, m))),
      "gate_ExF": (P(None, "model"), (E, F // m)),
      "down_FxE": (P("model", None), (F // m, E)),
      "embed_VxE": (P("model", None), (V // m, E)),
      "cache_k": (P(data, kv, None, None), (div(B, data, d), div(K, kv, m), None, D)),
      "tokens": (P(data, None), (div(B, data, d), None)),
  }


# Every registered method with pinned options (recycling's default template="auto" would pick
# its tree from timings measured under load, so the configuration under test would vary).
METHOD_OPTIONS = {"ar": {}, "pld": dict(k=4), "recycling": dict(template="small"), "draft": dict(k=3),
                  "jacobi": dict(n=4), "lookahead": dict(W=3, N=3, G=3), "sjd": dict(L=4),
                  "hidden_transfer": dict(nodes=6, cost=(1.0, 1.0, 1.0)),  # + random heads of the bundle
                  "auto": {}, "lud": dict(adapters="none", placeholder=0, k=3, beta=0.05, verify=True)}
ALL_METHODS_MESHES = ((2, 4), (4, 2))  # attention split over model=4 / model=2; AR alone on 1x8 and 8x1


def _generate(bundle, method: str):
  opts = dict(METHOD_OPTIONS[method])
  if method == "hidden_transfer":  # random heads (same seed: the same heads in every process)
    import tempfile
    from conftest import random_heads_folder
    opts["heads"] = str(random_heads_folder(bundle, Path(tempfile.mkdtemp()) / "heads", k=3, layer=1))
  return jaxspec.generate(bundle, PROMPTS, method, method_options=opts, max_new_tokens=NEW_TOKENS).token_ids


def _methods_for(name: str, mesh: tuple[int, int] | None = None) -> list[str]:
  """Every method on "kv4" at the single-device reference and on ALL_METHODS_MESHES; AR elsewhere."""
  if name == "kv4" and (mesh is None or tuple(mesh) in ALL_METHODS_MESHES):
    return sorted(METHOD_OPTIONS)
  return ["ar"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
  """Two 8-device workers (two meshes each) run while this process computes the single-device
  references; compilation dominates, so the two cores are kept busy in parallel."""
  from conftest import make_tiny_bundle
  tmp = tmp_path_factory.mktemp("sharding")
  workers = [_start_worker(tmp / "a.json", "tiny", "2x4,1x8", "pallas"),
             _start_worker(tmp / "b.json", "tiny", "4x2,8x1", "orbax,stream,train")]
  ref = {}
  for name, kw in TINY.items():
    bundle = make_tiny_bundle(**kw)
    ref[name] = {m: _generate(bundle, m) for m in _methods_for(name)}
  report = {"ref": ref}
  for part in (_finish_worker(w) for w in workers):
    for key, value in part.items():
      if isinstance(value, dict) and key in report:
        for name, per_mesh in value.items():
          report[key].setdefault(name, {}).update(per_mesh)
      else:
        report[key] = value
  return report


@pytest.mark.slow
def test_sharded_decoding_matches_single_device(tiny_report):
  """One test over the 8-device report (its workers are the expensive part; one test keeps them
  on one pytest-xdist worker): greedy outputs of every method, logits, param and cache
  shardings, Pallas attention per shard, streaming, and an orbax checkpoint moved across meshes."""
  ref, got = tiny_report["ref"], tiny_report["gen"]
  assert set(METHOD_OPTIONS) == set(jaxspec.METHODS), "a registered method has no sharding check"
  for name in TINY:
    for d, m in MESHES:
      methods = _methods_for(name, (d, m))
      assert sorted(got[name][f"{d}x{m}"]) == methods
      for method in methods:
        want = ref[name][method]
        assert all(len(r) > 0 for r in want)
        assert got[name][f"{d}x{m}"][method] == want, (name, method, d, m)
  assert tiny_report["stream_equal"]
  # logits agree within fp32 tolerance
  for name in TINY:
    for d, m in MESHES:
      err = tiny_report["logits_err"][name][f"{d}x{m}"]
      assert err < 1e-5, (name, d, m, err)
  # params and cache are sharded as the rules say
  for name in TINY:
    for d, m in MESHES:
      seen = tiny_report["specs"][name][f"{d}x{m}"]
      for array, (spec, shard) in _expected_specs(name, d, m).items():
        got_spec, got_shard = seen[array]
        assert got_spec == _norm_spec(spec, {"data": d, "model": m}), (name, d, m, array, got_spec)
        assert all(e is None or e == g for e, g in zip(shard, got_shard)), (name, d, m, array, got_shard)
  # Pallas attention runs per shard
  for key, err in tiny_report["pallas_err"].items():
    assert err < 1e-5, key
  # an orbax checkpoint written on 2x4 restores onto 4x2 and decodes the same
  o = tiny_report["orbax"]
  assert o["values_equal"] and o["token_ids"] == tiny_report["ref"]["kv4"]["ar"]
  assert o["k_spec"] == str(P(None, "model")) and o["k_mesh"] == {"data": 4, "model": 2}
  # a training checkpoint written on 2x4 resumes on 4x2, in place there, with the uninterrupted run's result
  t = tiny_report["train_resume"]
  assert t["max_err"] <= 1e-5 * t["scale"], t
  assert t["w1_spec"] == str(P(None, "model")) and t["w1_mesh"] == {"data": 4, "model": 2}


# ---------------------------------------------------------------------------------------------
# The real model: sharded loading from safetensors, greedy equality


@pytest.mark.slow
def test_real_model_loads_sharded_and_decodes_like_one_device(smollm2, tmp_path):
  from conftest import dev_prompts
  worker = _start_worker(tmp_path / "real.json", "real")
  ref = jaxspec.generate(smollm2, dev_prompts(2), max_new_tokens=16).token_ids
  out = _finish_worker(worker)
  assert out["token_ids"] == ref
  specs = out["specs"]  # 2x4: 3 kv / 9 q heads replicated, MLP and vocab split 4 ways
  mesh = {"data": 2, "model": 4}
  assert specs["q_ExHD"] == [_norm_spec(P(None, None), mesh), [576, 576]]
  assert specs["gate_ExF"] == [_norm_spec(P(None, "model"), mesh), [576, 384]]
  assert specs["embed_VxE"] == [_norm_spec(P("model", None), mesh), [12288, 576]]


# ---------------------------------------------------------------------------------------------
# Multi-host: two processes x 4 CPU devices, through the CLI


def _tiny_hf_folder(folder: Path, tokenizer_from: Path) -> Path:
  """A random 2-layer llama with SmolLM2's tokenizer, saved as a Hugging Face folder."""
  import shutil
  from safetensors.numpy import save_file
  folder.mkdir(parents=True, exist_ok=True)
  E, H, K, D, F, V, L = 48, 6, 3, 8, 96, 49152, 2
  cfg = dict(model_type="llama", hidden_size=E, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
             num_key_value_heads=K, head_dim=D, vocab_size=V, tie_word_embeddings=True, rms_norm_eps=1e-5,
             max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
  (folder / "config.json").write_text(json.dumps(cfg))
  rng = np.random.default_rng(0)
  w = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
  t = {"model.embed_tokens.weight": w(V, E), "model.norm.weight": np.ones(E, np.float32)}
  for i in range(L):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": np.ones(E, np.float32), p + "post_attention_layernorm.weight": np.ones(E, np.float32),
          p + "self_attn.q_proj.weight": w(H * D, E), p + "self_attn.k_proj.weight": w(K * D, E),
          p + "self_attn.v_proj.weight": w(K * D, E), p + "self_attn.o_proj.weight": w(E, H * D),
          p + "mlp.gate_proj.weight": w(F, E), p + "mlp.up_proj.weight": w(F, E), p + "mlp.down_proj.weight": w(E, F)}
  save_file(t, str(folder / "model.safetensors"))
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tokenizer_from / f, folder / f)
  return folder


@pytest.mark.slow
def test_two_process_cli_matches_single_process(tmp_path):
  from jaxspec.models.pull import resolve_model_path
  folder = _tiny_hf_folder(tmp_path / "tiny-llama", resolve_model_path("smollm2-135m-instruct", progress=False))
  args = ["generate", "--model", str(folder), "--no-chat", "--max-new-tokens", "8", "The cat", "Once upon a time"]
  cli = [sys.executable, "-m", "jaxspec.cli"]
  ref = subprocess.Popen(cli + args, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(cli + args + ["--mesh", "data=2,model=4"],
                            env=_env(4, JAXSPEC_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  ref_out, ref_err = ref.communicate(timeout=300)
  assert ref.returncode == 0, ref_err[-3000:]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Gloo writes its own connection log to stdout from C++ threads, sometimes mid-line, before the
  # first collective: compare from the first generation header on.
  ours = lambda text: text[text.index("--- [0]\n"):] if "--- [0]\n" in text else text
  assert "--- [1]" in ref_out and ours(outs[0][0]) == ref_out
  assert "--- [" not in outs[1][0]  # only process 0 prints


# ---------------------------------------------------------------------------------------------
# Workers (run as `python tests/test_sharding.py TASK [ARGS...] OUT.json` on 8 simulated devices)


def _norm_spec(spec, mesh_shape) -> str:
  """A spec with size-1 mesh axes and trailing Nones dropped (XLA returns P() for
  P("data", None) on data=1): equal strings iff the shardings are equivalent."""
  size = lambda a: 1 if a is None else mesh_shape[a] if isinstance(a, str) else int(np.prod([mesh_shape[n] for n in a]))
  axes = [a if size(a) > 1 else None for a in spec]
  while axes and axes[-1] is None:
    axes.pop()
  return str(P(*axes))


def _spec_and_shard(x) -> list:
  return [_norm_spec(x.sharding.spec, dict(x.sharding.mesh.shape)), list(x.addressable_shards[0].data.shape)]


def _param(params, *path):
  for p in path:
    params = params[p]
  return params[...]


def _param_specs(params) -> dict:
  blk = ("blocks", 0)
  return {"q_ExHD": _spec_and_shard(_param(params, *blk, "attn", "q_ExHD")),
          "k_ExKD": _spec_and_shard(_param(params, *blk, "attn", "k_ExKD")),
          "gate_ExF": _spec_and_shard(_param(params, *blk, "mlp", "gate_ExF")),
          "down_FxE": _spec_and_shard(_param(params, *blk, "mlp", "down_FxE")),
          "embed_VxE": _spec_and_shard(_param(params, "embed_VxE"))}


def _worker_tiny(meshes: str, extras: str, out: Path) -> None:
  import dataclasses
  import tempfile

  import jax.numpy as jnp
  from conftest import jit_forward, make_tiny_bundle
  from jax.sharding import NamedSharding

  from jaxspec import engine
  from jaxspec.api import _prepare
  from jaxspec.kernels import tree_attention
  from jaxspec.kernels.tree_attention_reference import tree_attention_reference
  from jaxspec.models.kv_cache import init_cache

  assert jax.device_count() == 8
  meshes = [tuple(int(n) for n in m.split("x")) for m in meshes.split(",")]
  report = {"gen": {}, "logits_err": {}, "specs": {}, "pallas_err": {}}
  toks = jnp.asarray(np.random.default_rng(0).integers(2, 64, (len(PROMPTS), 8)), jnp.int32)
  pos, mask = jnp.broadcast_to(jnp.arange(8), toks.shape), jnp.tril(jnp.ones((8, 8), bool))
  for name, kw in TINY.items():
    bundle = make_tiny_bundle(**kw)
    ref_logits = np.asarray(jit_forward(bundle)(init_cache(bundle.config, len(PROMPTS), 128), toks, pos, mask)[0])
    report["gen"][name], report["logits_err"][name], report["specs"][name] = {}, {}, {}
    for d, m in meshes:
      key = f"{d}x{m}"
      sb = shd.shard_bundle(bundle, jmesh.make_mesh(d, m))
      report["gen"][name][key] = {meth: _generate(sb, meth) for meth in _methods_for(name, (d, m))}
      layout = shd.layout_for(sb)
      cache = init_cache(sb.config, len(PROMPTS), 128)
      cache = jax.device_put(cache, layout.shardings(cache))
      logits = np.asarray(jit_forward(sb)(cache, toks, pos, mask)[0])
      report["logits_err"][name][key] = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
      # the state as generate builds it, after the sharded prefill
      meth, sampling, _, P_, state = _prepare(sb, PROMPTS, "ar", NEW_TOKENS, 0.0, 0, 1.0, 0, None, None, None,
                                              layout)
      state = engine.prefill_jit(shd.place(sb.params, layout), shd.place(state, layout, meth), graphdef=sb.graphdef,
                                 prompt_len=P_, sampling=sampling, eos_ids=sb.eos_ids, layout=layout)
      report["specs"][name][key] = dict(_param_specs(sb.params), cache_k=_spec_and_shard(state.cache.k[0]),
                                        tokens=_spec_and_shard(state.tokens))
      if "stream" in extras and name == "kv3" and "stream_equal" not in report:
        full = jaxspec.generate(sb, [PROMPTS[0]], max_new_tokens=10).texts[0]
        report["stream_equal"] = "".join(jaxspec.stream(sb, PROMPTS[0], max_new_tokens=10)) == full
    if "pallas" in extras:  # Pallas kernels are opaque to XLA: they run under shard_map per shard
      mesh = jmesh.make_mesh(2, 4)
      layout = shd.layout_for(bundle, mesh)
      H, K = kw["heads"], kw["kv_heads"]
      ks = jax.random.split(jax.random.key(0), 3)
      q = jax.random.normal(ks[0], (4, 3, H, 8))
      kc, vc = (jax.random.normal(k, (4, K, 128, 8)) for k in ks[1:])
      kn, vn = (jax.random.normal(jax.random.fold_in(k, 1), (4, K, 3, 8)) for k in ks[1:])
      lengths, tmask = jnp.asarray([5, 17, 0, 40], jnp.int32), jnp.tril(jnp.ones((3, 3), bool))
      want = tree_attention_reference(q, kc, vc, lengths, tmask, kn, vn)
      c_sh = NamedSharding(mesh, layout.spec(CACHE_AXES, kc.shape))

      def attend(q, kc, vc, lengths, tmask, kn, vn):
        return tree_attention(q, kc, vc, lengths, tmask, kn, vn, impl=layout.attention("pallas_gpu"),
                              interpret=True)

      put = lambda x: jax.device_put(x, c_sh)
      got = jax.jit(attend)(q, put(kc), put(vc), lengths, tmask, put(kn), put(vn))
      report["pallas_err"][name] = float(jnp.abs(got - want).max())

  if "orbax" in extras:  # save from 2x4, restore onto 4x2, decode with the restored params
    bundle = make_tiny_bundle(**TINY["kv4"])
    sb = shd.shard_bundle(bundle, jmesh.make_mesh(2, 4))
    with tempfile.TemporaryDirectory() as tmp:
      checkpoint.save_params(Path(tmp) / "params", sb.params)
      mesh = jmesh.make_mesh(4, 2)
      restored = checkpoint.restore_params(Path(tmp) / "params", bundle.params, mesh, config=bundle.config)
    k = _param(restored, "blocks", 0, "attn", "k_ExKD")
    rb = dataclasses.replace(bundle, params=restored, mesh=mesh, rules=shd.DEFAULT_RULES, method_memory={})
    report["orbax"] = {
        "values_equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                            zip(jax.tree.leaves(restored), jax.tree.leaves(bundle.params))),
        "k_spec": str(k.sharding.spec), "k_mesh": dict(k.sharding.mesh.shape), "token_ids": _generate(rb, "ar")}
  if "train" in extras:  # a training run checkpointed on 2x4 resumes on 4x2 like an uninterrupted one
    from test_train import CFG, _init, _loss, _problem

    from jaxspec.train import train
    specs = {"w1": P(None, "model"), "w2": P("model", None)}
    place = lambda params, mesh: {n: jax.device_put(x, NamedSharding(mesh, specs[n])) for n, x in params.items()}
    data, frozen = _problem(), {"scale": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
      full, _ = train(_loss, _init(), frozen, data, CFG, Path(tmp) / "a", progress=False)
      train(_loss, place(_init(), jmesh.make_mesh(2, 4)), frozen, data, CFG, Path(tmp) / "b", progress=False,
            stop_after=33)
      resumed, _ = train(_loss, place(_init(), jmesh.make_mesh(4, 2)), frozen, data, CFG, Path(tmp) / "b",
                         progress=False)
    report["train_resume"] = {
        "max_err": max(float(np.abs(np.asarray(full[n]) - np.asarray(resumed[n])).max()) for n in full),
        "scale": max(float(np.abs(np.asarray(full[n])).max()) for n in full),
        "w1_spec": str(resumed["w1"].sharding.spec), "w1_mesh": dict(resumed["w1"].sharding.mesh.shape)}
  out.write_text(json.dumps(report))


def _worker_real(out: Path) -> None:
  import jax.numpy as jnp
  from conftest import dev_prompts
  bundle = jaxspec.load_model("smollm2-135m-instruct", dtype=jnp.float32, progress=False,
                              mesh=jmesh.make_mesh(2, 4))
  res = jaxspec.generate(bundle, dev_prompts(2), max_new_tokens=16)
  out.write_text(json.dumps({"token_ids": res.token_ids, "specs": _param_specs(bundle.params)}))


if __name__ == "__main__":
  sys.path.insert(0, str(HERE))
  import conftest  # noqa: F401  (persistent compilation cache, as in the pytest process)
  {"tiny": _worker_tiny, "real": _worker_real}[sys.argv[1]](*sys.argv[2:-1], Path(sys.argv[-1]))
