"""``make-checkpoint``: a synthetic checkpoint in the release layout (tests, benchmarks, demos)."""

from __future__ import annotations

import argparse

from ..config import DECOY_RATIO
from .args import NON_NEGATIVE, POSITIVE, float_in
from .options import add_common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-checkpoint", help="write a synthetic checkpoint in the release layout")
    p.add_argument(
        "--preset",
        choices=["tiny", "tiny-lm", "small", "full"],
        default="tiny",
        help="model size (tiny-lm: tiny with head_dim 32 and a 64-wide language model, for vLLM's CPU build)",
    )
    p.add_argument("--out", required=True, help="checkpoint folder to create (required)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="tensor dtype on disk")
    p.add_argument("--shards", type=POSITIVE, default=2, help="number of safetensors shards")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="random seed of the weights")
    p.add_argument(
        "--decoy-ratio",
        type=float_in(0, 100),
        default=DECOY_RATIO,
        help="decoy language-model bytes per vision byte, 0 for none",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a checkpoint this command wrote (anything else is refused)",
    )
    p.add_argument(
        "--massive-activations",
        action="store_true",
        help="stress checkpoint: a few residual channels far above FP16's range from an early block on "
        "(default off; see docs/fp16.md)",
    )
    p.add_argument(
        "--with-language-model",
        action="store_true",
        help="write a full Step3p7 checkpoint: a real tiny language model (2 layers, one MoE) instead of decoys, a "
        "WordLevel tokenizer and a remote-code config class, loadable by transformers and vLLM (default off; "
        "use --preset tiny-lm for vLLM's CPU build; see docs/handoff.md)",
    )
    add_common(p)
    p.set_defaults(func=run_make_checkpoint)


def run_make_checkpoint(args: argparse.Namespace, progress: bool) -> int:
    from ..synthetic import make_checkpoint

    out = make_checkpoint(
        args.out,
        args.preset,
        args.dtype,
        args.shards,
        args.seed,
        progress=progress,
        overwrite=args.overwrite,
        decoy_ratio=args.decoy_ratio,
        massive_activations=args.massive_activations,
        with_language_model=args.with_language_model,
    )
    print(out)
    return 0
