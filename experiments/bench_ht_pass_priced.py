"""hidden_transfer with its partial pass priced into the sizing vs unpriced (the forward curve's
costs given explicitly, so `pass_cost` stays 0), same process, 26 held-out prompts x 128, repeats 2.
The explicit costs are this machine's curve at the sizes (1, 8, 14); on another machine print
`HiddenTransfer().resolve(bundle).cost` and put them here.

    python experiments/bench_ht_pass_priced.py --prompts spec_bench_dev.jsonl
"""
import argparse
import json
from pathlib import Path

from jaxspec.bench import format_table, run_bench

ap = argparse.ArgumentParser()
ap.add_argument("--prompts", required=True)
args = ap.parse_args()
cost = (1.0, 1.859529239992532, 2.2423918081071084)  # the curve's costs of sizes (1, 8, 14): the pass unpriced
methods = ["ar", ("hidden_transfer", {}, "hidden_transfer"),
           ("hidden_transfer", {"cost": cost}, "hidden_transfer:pass_unpriced")]
r = run_bench(methods=methods, prompts_path=args.prompts, per_category=2,
              warm_per_category=1, repeats=2, max_new_tokens=128, forward_curve=(1, 2, 4, 8, 16), progress=True)
json.dump(r, open(Path(__file__).resolve().parent / "results" / "bench_ht_pass_priced_s12.json", "w"), indent=1)
print(format_table(r))
