"""LUD fine-tuning: full fine-tune against LoRA adapters, from their training logs (eval on
held-out sequences, same data, k, alpha, batch and schedule length).

    python experiments/lud_full_vs_lora.py NAME=WORKDIR [NAME=WORKDIR ...]
      e.g. lora=runs/lud-lora-k4.work full_lr3e-5=runs/lud-full-k4.work

Writes experiments/results/lud_full_vs_lora.json (+ .png: eval unit loss and top-1 by step).
A log may be a workdir (its log.json) or a log JSON file (experiments/results/lud_train_log.json).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "lud_full_vs_lora.json"
KEYS = ("eval_unit_loss", "eval_top1_unit", "eval_ar_loss", "eval_top1_ar")


def read_log(path: Path) -> dict:
  log = json.loads((path / "log.json" if path.is_dir() else path).read_text())
  evals = [{k: r[k] for k in ("step",) + KEYS if k in r} for r in log if "eval_unit_loss" in r]
  speed = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
  return {"source": str(path), "evals": evals, "median_tokens_per_s": sorted(speed)[len(speed) // 2] if speed else None}


def main(argv: list[str]) -> int:
  if not argv or any("=" not in a for a in argv):
    print(__doc__)
    return 2
  from jaxspec.machine import machine_info
  runs = {name: read_log(Path(p)) for name, p in (a.split("=", 1) for a in argv)}
  report = {"machine_of_this_summary": machine_info(), "runs": runs, "written": time.strftime("%Y-%m-%d %H:%M")}
  OUT.write_text(json.dumps(report, indent=1))
  for name, r in runs.items():
    print(name, r["median_tokens_per_s"], [(e["step"], round(e["eval_unit_loss"], 3), round(e["eval_top1_unit"], 3),
                                            round(e["eval_ar_loss"], 3)) for e in r["evals"]])
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for name, r in runs.items():
      steps = [e["step"] for e in r["evals"]]
      for ax, key in zip(axes, ("eval_unit_loss", "eval_top1_unit", "eval_ar_loss")):
        ax.plot(steps, [e[key] for e in r["evals"]], marker="o", label=name)
        ax.set_title(key), ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=100)
  except ImportError:
    pass
  return 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
