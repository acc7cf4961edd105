"""Print the rotation results table for any model and data: float, RTN without rotation, random Hadamard,
learned (from a train_rotations.py output), and with --calib-data the GPTQ rows (GPTQ weights with the MSE clip
search, the activations and K/V as the RTN rows) on the learned and on the random-Hadamard rotation. The learned
model applies the online Hadamards (and clip ratios) its run records, and its GPTQ row rounds on the run's learned
weight grid when it has one (``quant.gptq.learned_grid``); pass --r3/--r4 so that the random-Hadamard rows use the
same online Hadamards.

    python launch/bench_table.py --model spinlearn/demo/model --data spinlearn/demo/data/test.txt \
        --calib-data spinlearn/demo/data/train.txt --learned runs/demo [--seqlen 256] [--max-windows 64] [--r3 --r4]

Every row goes through `spinlearn.evaluate.evaluate_setting`, the same code as `spinlearn eval`. Without
--learned the learned rows are skipped. Writes the table to --out (Markdown) when given.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the original (unrotated) model directory")
    ap.add_argument("--data", required=True, help="evaluation text (file/glob or hub name)")
    ap.add_argument("--calib-data", default=None, help="calibration text for GPTQ (needed for the GPTQ row)")
    ap.add_argument("--learned", default=None, help="output_dir of launch/train_rotations.py (holds model/)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--kv-bits", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows")
    ap.add_argument("--layout", default="transformer_universal")
    ap.add_argument("--r3", action="store_true", help="random-Hadamard row: add the online R3 Hadamard (Q/K)")
    ap.add_argument("--r4", action="store_true", help="random-Hadamard row: add the online R4 Hadamard (down_proj)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    args = ap.parse_args(argv)

    from spinlearn.data import calibration_blocks, eval_windows, load_text, tokenize_concat
    from spinlearn.evaluate import evaluate_setting
    from spinlearn.loading import load_tokenizer
    from spinlearn.report import format_table
    from spinlearn.quant import QuantSettings

    tok = load_tokenizer(args.model)
    windows = eval_windows(tokenize_concat(load_text(args.data, split="test"), tok), args.seqlen)
    windows = windows[: args.max_windows]
    calib = None
    if args.calib_data:
        ids = tokenize_concat(load_text(args.calib_data, split="train"), tok)
        calib = calibration_blocks(ids, args.nsamples, args.seqlen, args.seed)
    q = QuantSettings.from_flags(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits)
    qname = q.name
    rows = {}

    def row(label, model, **kw):
        t0 = time.perf_counter()
        rows[label] = evaluate_setting(model, windows, layout=args.layout, seed=args.seed, **kw)["ppl"]
        print(f"{label}: {rows[label]:.3f} [{time.perf_counter() - t0:.1f}s]", flush=True)

    row("float", args.model, rotation="none", quant=QuantSettings())
    row(f"{qname} RTN, no rotation", args.model, rotation="none", quant=q)
    online = "+R3" * args.r3 + "+R4" * args.r4
    row(f"{qname} RTN, random Hadamard rotation{' (R1+R2' + online + ')' if online else ''}", args.model,
        rotation="hadamard", quant=q, r3=args.r3, r4=args.r4)
    gq = QuantSettings.from_flags(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, w_clip=True)
    gptq = {"quant": gq, "w_method": "gptq", "calib_blocks": calib}
    if args.learned:
        learned_model = str(Path(args.learned) / "model")
        row(f"{qname} RTN, learned rotation", learned_model, rotation="learned", quant=q)
        if calib is not None:
            row(f"{qname} GPTQ, learned rotation", learned_model, rotation="learned", **gptq)
    if calib is not None:
        row(f"{qname} GPTQ, random Hadamard rotation", args.model, rotation="hadamard", r3=args.r3, r4=args.r4, **gptq)
    table = format_table({"model": args.model, "rows": rows})
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
