"""``embed``: image files -> the projected features of each (FILE.npy) and its token layout
(FILE.json), in process with a checkpoint and its ONNX files or engines."""

from __future__ import annotations

import argparse
import logging

from ..config import MAX_PIXELS
from .args import POSITIVE
from .options import add_common

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="image(s) -> projected features per image + token layout")
    p.add_argument("--backend", choices=["trt", "onnx", "torch"], required=True, help="runner kind (required)")
    p.add_argument(
        "--artifacts",
        required=True,
        nargs="+",
        help="checkpoint dir (projector, tokens) and, for onnx/trt, the 728 and 504 files (required)",
    )
    p.add_argument("--image", action="append", required=True, help="image file, repeatable (required)")
    p.add_argument(
        "--out", required=True, help="FILE.npy (required); FILE.json with the token layout is written beside it"
    )
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--batch", type=POSITIVE, default=8, help="views per runner call")
    p.add_argument(
        "--max-pixels",
        type=POSITIVE,
        default=MAX_PIXELS,
        help="refuse images with more pixels (width x height) than this before decoding them",
    )
    add_common(p)
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace, progress: bool) -> int:
    """Features per image to FILE.npy, layout to FILE.json (both atomic; checked before any work)."""
    import numpy as np

    from ..files import atomic_path, write_json
    from ..preprocess import PreprocessConfig
    from ..runtime import VisionEmbedder, check_embed_outputs

    out, side = check_embed_outputs(args.out, args.artifacts, args.image)
    checkpoint, *files = args.artifacts
    emb = VisionEmbedder.from_artifacts(
        checkpoint,
        args.backend,
        files,
        provider=args.provider,
        batch_size=args.batch,
        preprocess_cfg=PreprocessConfig(max_pixels=args.max_pixels),
    )
    results = emb.embed_images(args.image)
    feats = [
        np.asarray(r.features.float().cpu() if hasattr(r.features, "cpu") else r.features, np.float32) for r in results
    ]
    all_feats = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    layout, start = [], 0
    for path, r, f in zip(args.image, results, feats, strict=True):
        layout.append(
            {
                "image": str(path),
                "rows": [start, start + len(f)],
                "num_crops": r.num_crops,
                "newline_mask": r.newline_mask,
                "token_ids": r.token_ids,
                "text": r.text,
            }
        )
        start += len(f)
    with atomic_path(out, suffix=".npy") as tmp:
        np.save(tmp, all_feats)
    write_json(side, {"hidden_size": int(all_feats.shape[-1]), "images": layout})
    log.info("wrote %s %s and %s", out, all_feats.shape, side)
    return 0
