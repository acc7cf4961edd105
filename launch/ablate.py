"""Run a grid of recipe variants over seeds and print what each closes of the random-Hadamard -> float gap.

    python launch/ablate.py --config recipes/demo.yaml --out runs/ablation                  # the issue-8 grid
    python launch/ablate.py --config recipes/demo.yaml --out runs/ablation --workers 8 --seeds 0 1 2 3 4
    python launch/ablate.py --config recipes/demo.yaml --out runs/abl --cells "+ scales + clip" --online on \
        --workers 2 model.path=spinlearn/demo/model_b                                       # extra overrides
    python launch/ablate.py --config recipes/demo.yaml --out runs/abl-gptq --weights gptq   # W16A4KV4 + GPTQ

(Overrides go after an option that takes one value, such as --workers: --cells, --online and --seeds take lists.)

Every cell is the recipe plus the cell's overrides (and the online setting: `off` = no R3/R4, `on` = the recipe's
R3 and R4 on), run once per seed with `rotation.seed=S data.seed=S` (the start rotation and the calibration
sample) as `launch/train_rotations.py` in its own process, `--workers` at a time (each with one CPU thread; on a
GPU machine they share the GPU). Finished runs (a metrics.json) are reused, so an interrupted grid resumes. Exports
and reporting are off. The table gives, per cell, the mean and spread (sample standard deviation) over seeds of the
random-Hadamard perplexity (the run's start), the learned one (after the guard), and the share of the gap closed,
(random Hadamard - learned) / (random Hadamard - float), computed per seed.

Runs with the GPTQ rows (``eval.baselines: true``, as in the demo recipe) add them to the table: the start matrices +
GPTQ, the learned ones + GPTQ (W4A4KV4: GPTQ weights, the recipe's activations and K/V), and the gap closed between
the first and float. ``--weights gptq``: SpinQuant's W16A4KV4 mode (the rotations learned with 16-bit weights, GPTQ
W4 after, with the MSE clip search of the W16A4KV4 recipes); the cells that learn weight clip ratios (an RTN
setting) are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train_rotations.py"
METRICS_FILE = "metrics.json"  # spinlearn.artifacts' name; read here without importing torch
# cell -> recipe overrides (issue 8's rows). Every cell sets every switch, whatever the recipe says;
# "KL" = distillation alone, KL(float teacher || quantized student), no cross-entropy.
CE = ["loss.ce_weight=1", "loss.kl_weight=0"]
KL = ["loss.ce_weight=0", "loss.kl_weight=1"]
SWITCHES = ("rotation.learn_scales", "quant.learn_a_clip", "quant.learn_w_clip", "quant.learn_kv_clip")


def switches(*on: str) -> list[str]:
    """Overrides turning the named learned extras on and every other one off."""
    return [f"{key}={'true' if key in on else 'false'}" for key in SWITCHES]


SCALES, A_CLIP, W_CLIP, KV_CLIP = SWITCHES
W_FULL = "quant.w_clip_init=full"  # learned weight clips start at 0.99 (the demo recipe's MSE start is its own cell)
CELLS = {
    "learned R1/R2": [*switches(), *CE],
    "+ scales": [*switches(SCALES), *CE],
    "+ scales + KL": [*switches(SCALES), *KL],
    "+ scales + top-32 KL": [*switches(SCALES), *KL, "loss.kl_topk=32"],
    "+ scales + clip": [*switches(SCALES, A_CLIP), *CE],
    "+ scales + KL + clip": [*switches(SCALES, A_CLIP), *KL],
    "+ scales + clip + KV clip": [*switches(SCALES, A_CLIP, KV_CLIP), *CE],
    "+ scales + clip + weight clip": [*switches(SCALES, A_CLIP, W_CLIP), *CE, W_FULL],
    "+ scales + clip + weight clip + KV clip": [*switches(SCALES, A_CLIP, W_CLIP, KV_CLIP), *CE, W_FULL],
    "+ scales + KL + clip + weight clip + KV clip": [*switches(SCALES, A_CLIP, W_CLIP, KV_CLIP), *KL, W_FULL],
    "+ scales + KL + clip + weight clip (MSE start) + KV clip": [*switches(SCALES, A_CLIP, W_CLIP, KV_CLIP), *KL,
                                                                 "quant.w_clip_init=mse"],
}
ONLINE = {"off": ["rotation.r3=false", "rotation.r4=false"], "on": ["rotation.r3=true", "rotation.r4=true"]}
QUIET = ["train.report_to=[none]", "export.schemes=[]", "overwrite_output_dir=true"]
# --weights: how the final weights are quantized ("gptq": train W16A4KV4, GPTQ W4 after, both rows measured)
WEIGHTS = {"rtn": [], "gptq": ["quant.w_bits=16", "quant.w_method=gptq", "quant.gptq.w_bits=4", "quant.w_clip=true",
                               "eval.baselines=true"]}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def run_one(config: str, out: Path, cell: str, online: str, seed: int, extra: list[str], weights: str = "rtn") -> dict:
    """One training run (or its earlier result); returns its metrics.json, or {"error": ...}."""
    run_dir = out / f"{slug(cell)}__{online}{'' if weights == 'rtn' else '__' + weights}__s{seed}"
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        overrides = [*QUIET, *CELLS[cell], *ONLINE[online], *WEIGHTS[weights], *extra, f"rotation.seed={seed}",
                     f"data.seed={seed}", f"output_dir={run_dir}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled",
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        log = out / f"{run_dir.name}.log"
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, str(TRAIN), "--config", config, *overrides], env=env,
                                  stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode != 0 or not metrics.is_file():
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            return {"error": f"exit {proc.returncode}: {tail[0][:200]} (log: {log})"}
    return json.loads(metrics.read_text())


def mean_spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def gap_columns(ok: list[dict], start: str, learned: str) -> list[str]:
    """Mean ± spread of the start row, the learned row and the gap closed (per seed) between the start and float."""
    fl = [r["ppl_float"] for r in ok]
    st, le = [r[start] for r in ok], [r[learned] for r in ok]
    gap = [100 * (b - a) / (b - f) for f, b, a in zip(fl, st, le)]
    return [mean_spread(st), mean_spread(le), mean_spread(gap, 1)]


def table(results: dict, seeds: list[int]) -> str:
    gptq = any("ppl_gptq_start" in r for runs in results.values() for r in runs)
    extra = " random Hadamard + GPTQ | learned + GPTQ | GPTQ gap closed (%) |" if gptq else ""
    head = "| cell | R3/R4 | float | random Hadamard | learned | gap closed (%) |"
    rule = "|---|---|---|---|---|---|" + "---|" * (3 if gptq else 0) + "---|---|"
    lines = [head + extra + " guard kept start | runs |", rule]
    for (cell, online), runs in results.items():
        ok = [r for r in runs if "error" not in r]
        cols = [mean_spread([r["ppl_float"] for r in ok]), *gap_columns(ok, "ppl_quant_before", "ppl_quant_after")]
        if gptq:
            cols += gap_columns(ok, "ppl_gptq_start", "ppl_gptq")
        kept = sum(r.get("guard", {}).get("kept") == "start" for r in ok)
        lines.append(f"| {cell} | {online} | {' | '.join(cols)} | {kept} | {len(ok)}/{len(seeds)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the recipe every cell starts from")
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs (one sub-folder per run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    ap.add_argument("--online", nargs="+", choices=list(ONLINE), default=list(ONLINE))
    ap.add_argument("--weights", choices=list(WEIGHTS), default="rtn",
                    help="rtn: the recipe's W4 round-to-nearest; gptq: W16A4KV4 training, GPTQ W4 after")
    ap.add_argument("--workers", type=int, default=1, help="runs at a time")
    ap.add_argument("--json", type=Path, help="also write every run's metrics here")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args(argv)

    cells = [c for c in args.cells if args.weights == "rtn" or f"{W_CLIP}=true" not in CELLS[c]]
    if not cells:
        ap.error("--weights gptq: every chosen cell learns weight clip ratios, an RTN setting")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(c, o, s) for o in args.online for c in cells for s in args.seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {j: pool.submit(run_one, args.config, args.out, *j, args.overrides, args.weights) for j in jobs}
        results: dict = {}
        for (cell, online, seed), fut in futures.items():
            r = fut.result()
            results.setdefault((cell, online), []).append(r)
            status = r["error"] if "error" in r else f"learned {r['ppl_quant_after']:.3f}"
            print(f"# {cell} | {online} | seed {seed}: {status}", flush=True)
    print(f"\n{args.config} {' '.join(args.overrides)}; seeds {args.seeds}\n")
    print(table(results, args.seeds))
    if args.json:
        args.json.write_text(json.dumps({f"{c} | {o}": r for (c, o), r in results.items()}, indent=2))
    return 0 if all("error" not in r for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
