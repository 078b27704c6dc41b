"""``step37-deploy``: the command line over the pipeline stages.

Every long command shows progress bars and logs at INFO; ``--quiet`` silences both.  Exit status:
0 success; 1 a missed accuracy threshold; 2 an error the user can cause (a bad argument or file:
:class:`~step37_deploy.errors.Step37Error`, one line naming it); 3 anything unexpected (one line
``internal error``, the traceback with ``--verbose``); 4 ``serve`` only: a served process crashed or
stalled and the whole server was taken down (:class:`~step37_deploy.errors.ServerCrashed`), for a
supervisor to restart it.  Heavy modules (torch, onnx, TensorRT) are
imported inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from .errors import ServerCrashed, Step37Error, ThresholdError, UsageError

log = logging.getLogger("step37_deploy")


EXIT_OK, EXIT_THRESHOLD, EXIT_USER_ERROR, EXIT_INTERNAL = 0, 1, 2, 3
#: ``serve``: a served process crashed or stalled and the server was taken down (restart it).
EXIT_CRASH = 4


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help unless the text already states its default
    or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return text if "required" in text.lower() or not action.option_strings else f"{text} (required)"
        if "default" in text.lower():
            return text
        return super()._get_help_string(action) or ""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, ``step37-deploy SUBCOMMAND: error: MESSAGE`` (exit 2), and no
    abbreviated options (``--over`` must not mean ``--overwrite``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        # A value such as "-1:1:8" (--batch) reads as a negative number, not as an unknown option,
        # so the option's own check names the problem instead of "expected one argument".
        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(:-?\d+)+$")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {_one_line(message)}\n")


class _SubcommandParser(_Parser):
    """A subcommand's parser: an unknown option is refused here, so the message names the
    subcommand (the top parser would only say ``step37-deploy: error: unrecognized arguments``)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging; tracebacks of internal errors")


# -- argument types: a bad number is an argparse error (exit 2) naming the option ------------------
def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo`` (and <= ``hi``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi] (or (lo, hi] with ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
            raise argparse.ArgumentTypeError(f"must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
PORT = int_at_least(0, 65535)


def finite_above(lo: float, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number > ``lo`` (>= with ``inclusive``); inf and nan are refused,
    since an infinite tolerance or timeout would make a check that checks nothing."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (value == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {lo:g}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_FLOAT = finite_above(0)
NON_NEGATIVE_FLOAT = finite_above(0, inclusive=True)


def _add_runner_options(p: argparse.ArgumentParser, torch_default: list[str] | None, torch_help: str) -> None:
    """The runners ``compare`` and ``bench`` take (built by ``backends.factory.runners_from_args``)."""
    p.add_argument("--checkpoint", required=True, help="checkpoint folder: reference and projector (required)")
    p.add_argument("--onnx", action="append", default=[], help="ONNX file, repeatable (default: none)")
    p.add_argument("--engine", action="append", default=[], help="TensorRT engine, repeatable (default: none)")
    p.add_argument("--torch", action="append", default=torch_default, choices=["fp32", "fp16", "bf16"], help=torch_help)
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--device", default="cpu", help="torch device for the --torch runners (cpu, cuda)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="CPU threads per runner (default: all cores)")


def _add_input_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        choices=["float", "uint8"],
        default="float",
        help="pixel_values the graph takes: float (CLIP-normalised views, default) or uint8 "
        "(raw 0..255 views; the normalisation is folded into conv1, the host skips the float conversion)",
    )


def _add_calibration(p: argparse.ArgumentParser) -> None:
    """FP16 export's activation-range calibration (step37_deploy.calibrate)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--calibrate",
        nargs="+",
        metavar="IMAGE",
        default=None,
        help="FP16: calibrate activation ranges on these images (default: seeded random CLIP-normalised views)",
    )
    g.add_argument(
        "--no-calibrate",
        action="store_true",
        help="FP16: skip the activation-range calibration and its overflow protection (default: calibrate)",
    )
    p.add_argument(
        "--calibration-views",
        type=POSITIVE,
        default=2,  # calibrate.DEFAULT_VIEWS; not imported here so that --help stays torch-free
        help="FP16: number of random calibration views when no --calibrate images are given (default 2)",
    )
    p.add_argument(
        "--calibration-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="FP16: dtype the calibration runs the tower in (default fp32; bf16 measures the same ranges "
        "to ~1%% and is several times faster on CPUs with AMX)",
    )


def _calibration_kwargs(args: argparse.Namespace) -> dict:
    return {
        "calibrate": not args.no_calibrate,
        "calibration_images": args.calibrate,
        "calibration_views": args.calibration_views,
        "calibration_dtype": args.calibration_dtype,
    }


def _parse_batch_profile(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be MIN:OPT:MAX integers, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"must be MIN:OPT:MAX, got {text!r}")
    if min(parts) < 1:  # the order (MIN <= OPT <= MAX) is the engine builder's check
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return parts  # type: ignore[return-value]


def _add_repository_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``triton-repo`` and ``serve`` (what goes into the model configs)."""
    # Defaults are repeated here (not imported) so that --help stays torch-free.
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder: projector, token ids, config; weights for torch (required)",
    )
    p.add_argument("--backend", choices=["trt", "onnx", "torch"], required=True, help="what runs the towers (required)")
    p.add_argument(
        "--artifacts",
        nargs="+",
        default=[],
        metavar="FILE",
        help="trt: the 728 and 504 engines; onnx: the 728 and 504 ONNX files (default: none, for torch)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="towers' max_batch_size (default: the engine profile MAX for trt, never above it; 8 otherwise)",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=None,
        help="dynamic batching: how long a tower waits for more views (default 2000 microseconds for trt towers, "
        "0 for onnx/torch towers on the CPU)",
    )
    p.add_argument(
        "--preprocess-instances",
        type=int,
        default=None,
        help="embedder instances, i.e. parallel preprocessing processes (default: the number of usable CPUs)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=89_478_485,
        help="refuse larger images as decompression bombs (default 89478485, Pillow's own limit)",
    )
    p.add_argument("--cuda-graphs", action="store_true", help="trt towers: capture CUDA graphs (default off)")
    p.add_argument("--no-warmup", action="store_true", help="trt towers: no warmup request at load (default: warm up)")
    p.add_argument(
        "--tower-threads",
        type=int,
        default=None,
        help="onnx/torch towers: intra-op threads each (default: the usable cores; serve states its choice)",
    )
    p.add_argument(
        "--cache-mb",
        type=float,
        default=256.0,
        help="embedding cache of each embedder instance, MiB, keyed by the image bytes' SHA-256 (default 256; 0 = off)",
    )
    p.add_argument(
        "--max-queue-size",
        type=POSITIVE,
        default=32,
        help="requests each model may hold waiting; one more is refused at once with UNAVAILABLE (default 32; "
        "towers get at least what the embedder instances can send them)",
    )
    p.add_argument(
        "--queue-timeout-ms",
        type=POSITIVE,
        default=5000,
        help="longest wait in a model's queue before a request is refused with UNAVAILABLE; a client's own "
        "timeout request parameter overrides it (default 5000)",
    )


def _repository_options(args: argparse.Namespace):
    from .serving.repository import RepositoryOptions

    return RepositoryOptions(
        max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
        preprocess_instances=args.preprocess_instances,
        max_image_pixels=args.max_image_pixels,
        cuda_graphs=args.cuda_graphs,
        warmup=not args.no_warmup,
        tower_threads=args.tower_threads,
        cache_mb=args.cache_mb,
        max_queue_size=args.max_queue_size,
        queue_timeout_ms=args.queue_timeout_ms,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="step37-deploy",
        description=__doc__.splitlines()[0],
        epilog="exit status: 0 ok, 1 accuracy threshold missed, 2 bad argument or input, 3 internal error",
    )
    # Every subcommand (those added later included) shows each option's default in its --help.
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=functools.partial(_SubcommandParser, formatter_class=_HelpFormatter),
    )

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
        default=1.25,  # synthetic.DECOY_RATIO; not imported here so that --help stays torch-free
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
    _add_common(p)

    p = sub.add_parser("export", help="export the vision tower to ONNX (one file per resolution)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (required)")
    p.add_argument("--out", default="engines", help="output folder")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp16", help="graph precision")
    p.add_argument(
        "--resolution",
        type=POSITIVE,
        action="append",
        help="728 (global view) and/or 504 (crops), repeatable (default: both)",
    )
    p.add_argument("--opset", type=POSITIVE, default=None, help="ONNX opset, 18..21 (default: 18)")
    p.add_argument(
        "--fp32-residual",
        action="store_true",
        help="FP16 graph: keep the residual stream in FP32 too (see docs/fp16.md)",
    )
    p.add_argument(
        "--fp16-softmax",
        action="store_true",
        help="FP16 graph: softmax in FP16, a cast-free MatMul-Softmax-MatMul (see docs/fp16.md)",
    )
    _add_input_option(p)
    _add_calibration(p)
    _add_common(p)

    p = sub.add_parser("compare", help="accuracy report of ONNX files / engines against PyTorch FP32")
    _add_runner_options(p, [], "also compare eager PyTorch in this dtype, repeatable (default: none)")
    p.add_argument("--batch", type=POSITIVE, action="append", help="batch sizes, repeatable (default: 1 and 3)")
    p.add_argument(
        "--resolution",
        type=POSITIVE,
        action="append",
        help="resolutions to compare, repeatable (default: each runner's own, else 728 and 504)",
    )
    p.add_argument("--images", nargs="*", help="image files instead of random images (default: random images)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the random images")
    p.add_argument("--json", default=None, help="write the report here, atomically (default: not written)")
    p.add_argument(
        "--cos-min", type=float, default=None, help="override the min cosine threshold (default: per precision)"
    )
    p.add_argument(
        "--rel-l2", type=float, default=None, help="override the relative L2 threshold (default: per precision)"
    )
    p.add_argument(
        "--per-block",
        action="store_true",
        help="also compare every block's output of the (one) --onnx file with PyTorch FP32 and name the "
        "first divergent block (default off; uses the first --batch and the file's resolution)",
    )
    _add_common(p)

    p = sub.add_parser("pipeline", help="export both resolutions (+ engines) and write the accuracy report")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (required)")
    p.add_argument("--out", default="engines", help="output folder")
    p.add_argument("--precision", action="append", choices=["fp32", "fp16"], help="repeatable (default: fp32 and fp16)")
    p.add_argument("--resolution", type=POSITIVE, action="append", help="repeatable (default: 728 and 504)")
    p.add_argument("--batch", type=POSITIVE, action="append", help="compare batch sizes, repeatable (default: 1 and 3)")
    p.add_argument("--opset", type=POSITIVE, default=None, help="ONNX opset, 18..21 (default: 18)")
    p.add_argument("--no-engines", action="store_true", help="skip the TensorRT build even if a flavour is installed")
    _add_input_option(p)
    _add_calibration(p)
    _add_common(p)

    p = sub.add_parser("build", help="build a TensorRT engine from an FP16-typed ONNX file")
    p.add_argument("--onnx", required=True, help="FP16-typed ONNX file from export (required)")
    p.add_argument("--out", required=True, help="engine file, e.g. engines/NAME.plan; NAME.plan.json beside it")
    p.add_argument(
        "--batch",
        type=_parse_batch_profile,
        default="1:1:8",
        help="optimisation profile MIN:OPT:MAX, 1 <= MIN <= OPT <= MAX",
    )
    p.add_argument(
        "--timing-cache",
        default=None,
        help="TensorRT timing cache to read if present and (re)write after the build (default: none)",
    )
    p.add_argument(
        "--workspace",
        type=float_in(0, 1 << 20, lo_open=True),
        default=None,
        help="workspace limit in GiB (default: TensorRT's)",
    )
    p.add_argument(
        "--opt-level",
        type=int_at_least(0, 5),
        default=None,
        help="builder optimisation level 0..5 (default: TensorRT's)",
    )
    p.add_argument(
        "--compute-capability",
        action="append",
        default=None,
        help="X.Y; TensorRT-RTX ahead-of-time targets, repeatable (default: this GPU, else 8.6 and 8.9)",
    )
    p.add_argument("--allow-fp32", action="store_true", help="accept an FP32-typed graph")
    _add_common(p)

    p = sub.add_parser("inspect", help="print an engine's manifest (and TensorRT's inspector output)")
    p.add_argument("engine", help="engine file with its NAME.plan.json manifest beside it")
    _add_common(p)

    p = sub.add_parser("bench", help="latency of backends side by side, as ratios")
    _add_runner_options(
        p, None, "eager PyTorch in this dtype, repeatable; the first runner is the baseline (default: fp32)"
    )
    p.add_argument("--batch", type=POSITIVE, default=1, help="batch size")
    p.add_argument(
        "--resolution", type=POSITIVE, default=None, help="input resolution (default: the files' own, else 728)"
    )
    p.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="untimed calls per runner")
    p.add_argument("--iters", type=POSITIVE, default=10, help="timed calls per runner")
    p.add_argument("--insertion", action="store_true", help="also benchmark insertion vs memcpy")
    p.add_argument("--json", default=None, help="write the result here, atomically (default: not written)")
    _add_common(p)

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
        default=89_478_485,  # preprocess.MAX_PIXELS; not imported here so that --help stays light
        help="refuse images with more pixels (width x height) than this before decoding them",
    )
    _add_common(p)

    _add_loadtest_parser(sub)
    _add_serving_parsers(sub)
    _add_handoff_parser(sub)
    _add_handoff_parsers(sub)
    return parser


def _add_handoff_parser(sub: argparse._SubParsersAction) -> None:
    """``handoff TARGET``: one target per LLM engine (``step37_deploy/handoff/TARGET.py``)."""
    p = sub.add_parser("handoff", help="turn the service's embeddings into an LLM engine's request")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET", help="the LLM engine: sglang")
    t = targets.add_parser(
        "sglang",
        help="write SGLang's /generate body (expanded input_ids + precomputed_embedding rows) for a prompt",
        formatter_class=_HelpFormatter,
    )
    t.add_argument("--url", required=True, help="HOST:PORT of the embedding service (its --protocol endpoint)")
    t.add_argument("--protocol", choices=["http", "grpc"], default="http", help="protocol of --url")
    t.add_argument("--timeout", type=POSITIVE_FLOAT, default=60.0, help="seconds one embedding request may take")
    t.add_argument("--tokenizer", required=True, help="folder with the checkpoint's tokenizer (tokenizer.json)")
    t.add_argument("--prompt", required=True, help="prompt text with one <im_patch> where each --image goes")
    t.add_argument("--image", action="append", required=True, help="image file, repeatable, in prompt order")
    t.add_argument("--out", required=True, help="the JSON body to write (atomically; replaces only such a body)")
    t.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="rows asked of the service: bf16 rounds them as a bf16 LLM will (half the bytes from the service)",
    )
    t.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="sampling_params.max_new_tokens")
    t.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="sampling_params.temperature")
    _add_common(t)


def _add_handoff_parsers(sub: argparse._SubParsersAction) -> None:
    """vLLM hand-off: ``vllm-cache`` (write encoder-cache files) and ``epd-router`` (an OpenAI front)."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--checkpoint", required=True, help="checkpoint folder: token ids (and weights for torch; required)"
        )
        p.add_argument("--dir", required=True, help="vLLM's shared_storage_path: files go to DIR/ID/ (required)")
        p.add_argument(
            "--dtype",
            choices=["bf16", "fp16", "fp32"],
            default="bf16",
            help="the LLM's dtype, the files' (default bf16)",
        )
        p.add_argument(
            "--mismatch",
            choices=["vllm", "refuse"],
            default="vllm",
            help="images vLLM 0.32 crops unlike the reference: follow vLLM's layout, or refuse (default vllm)",
        )
        p.add_argument(
            "--max-age-s",
            type=float_in(0, 1e9),
            default=3600,
            help="retention: remove our files older than this many seconds (default 3600; 0: no limit)",
        )
        p.add_argument(
            "--max-gb",
            type=float_in(0, 1e6),
            default=8.0,
            help="retention: keep our files under this many GB, oldest removed first (default 8; 0: no limit)",
        )

    def source(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument(
            "--server",
            required=required,
            default=None,
            help="the embedding service, HOST:PORT" + (" (required)" if required else " (default: embed in process)"),
        )
        p.add_argument(
            "--protocol", choices=["grpc", "http"], default="grpc", help="--server's protocol (default grpc)"
        )

    p = sub.add_parser("vllm-cache", help="embed images and write vLLM encoder-cache files (ec_consumer input)")
    common(p)
    source(p, required=False)
    p.add_argument(
        "--backend",
        choices=["trt", "onnx", "torch"],
        default=None,
        help="in-process runner instead of --server (default none)",
    )
    p.add_argument("--artifacts", nargs="+", default=[], help="onnx/trt: the 728 and 504 files (default: none)")
    p.add_argument("--image", action="append", required=True, help="image file, repeatable (required)")
    p.add_argument(
        "--id",
        action="append",
        default=None,
        help="multi_modal_uuid per image, repeatable (default: sha256 of its bytes)",
    )
    _add_common(p)

    p = sub.add_parser("epd-router", help="OpenAI-compatible front: embed via the service, forward to vLLM by ID")
    common(p)
    source(p, required=True)
    p.add_argument("--vllm-url", required=True, help="vLLM's OpenAI server (ec_consumer), http://HOST:PORT (required)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=PORT, default=8100, help="port to listen on (default 8100)")
    p.add_argument("--max-body-mb", type=POSITIVE, default=64, help="largest request body (default 64 MiB)")
    p.add_argument("--max-images", type=POSITIVE, default=8, help="images per request (default 8)")
    p.add_argument("--max-inflight", type=POSITIVE, default=16, help="requests in flight; more get 429 (default 16)")
    _add_common(p)


def _add_serving_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton-repo", help="write a Triton model repository (two towers + the embedder)")
    _add_repository_options(p)
    p.add_argument("--out", required=True, help="the repository folder to write (required; must be new or empty)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a repository step37-deploy wrote there before (default off)"
    )
    _add_common(p)

    p = sub.add_parser("serve", help="serve the embedder with a real tritonserver, in the foreground")
    _add_repository_options(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the service listens on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)",
    )
    p.add_argument("--http-port", type=PORT, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=PORT, default=8001, help="gRPC port (default 8001; 0 picks a free one)")
    p.add_argument("--metrics-port", type=PORT, default=8002, help="Prometheus metrics port (default 8002; 0: free)")
    p.add_argument(
        "--tritonserver",
        default=None,
        help="your own tritonserver binary (default: the one nvidia-pytriton ships, with its Python backend)",
    )
    p.add_argument(
        "--exit-timeout",
        type=POSITIVE,
        default=30,
        help="on SIGINT/SIGTERM, seconds to finish in-flight requests (default 30)",
    )
    p.add_argument(
        "--ready-timeout",
        type=POSITIVE_FLOAT,
        default=600,
        help="seconds to wait until every model is loaded (default 600)",
    )
    p.add_argument("--log-verbose", type=NON_NEGATIVE, default=0, help="tritonserver --log-verbose level (default 0)")
    _add_security_options(p)
    _add_common(p)


def _add_security_options(p: argparse.ArgumentParser) -> None:
    """``serve``'s gateway, limits, key and TLS (docs/serving.md, "Security")."""
    # Defaults repeated from serving/gateway.py (not imported: --help stays light).
    p.add_argument(
        "--no-gateway",
        action="store_true",
        help="no nginx in front: tritonserver listens on --host itself, with NO body-size, compressed-body, "
        "connection or idle limits, so one client can exhaust its memory or file descriptors "
        "(default: the nginx gateway)",
    )
    p.add_argument(
        "--max-body-mb",
        type=POSITIVE_FLOAT,
        default=64.0,
        help="gateway: refuse request bodies larger than this, MiB (default 64: a 12 MP PNG of noise is 34 MiB)",
    )
    p.add_argument(
        "--max-connections",
        type=POSITIVE,
        default=1024,
        help="gateway: requests in flight per port; more are refused at once (HTTP 503, gRPC UNAVAILABLE); "
        "open connections are bounded at 2x this + 64, idle ones closed first (default 1024)",
    )
    p.add_argument(
        "--idle-timeout-s",
        type=POSITIVE_FLOAT,
        default=60.0,
        help="gateway: close a connection idle this long, or sending a request's header or body this slowly "
        "(default 60)",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="gateway: inference, metadata and statistics require the header x-api-key: <FILE's first line>; "
        "health stays open; FILE must be mode 600 (default: no key)",
    )
    p.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="TLS certificate (with --tls-key): HTTPS and gRPC over TLS at the gateway; with --no-gateway "
        "gRPC only (default: no TLS)",
    )
    p.add_argument("--tls-key", default=None, metavar="PEM", help="TLS private key of --tls-cert (default none)")
    p.add_argument(
        "--allow-shared-memory",
        action="store_true",
        help="open Triton's system/CUDA shared-memory APIs: any client that reaches the port can then make the "
        "server read and write shared memory regions of this host, including other processes' (default: refused)",
    )


def _add_loadtest_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest",
        help="drive a running service with concurrent requests and check every answer against the in-process embedder",
    )
    p.add_argument(
        "--url", required=True, help="HOST:PORT of the service: its HTTP endpoint, or gRPC with --protocol grpc"
    )
    p.add_argument("--protocol", choices=["http", "grpc"], default="http", help="protocol of --url (default http)")
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="send x-api-key: <FILE's first line>, for a serve --api-key-file service (default: no key)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS (HTTPS / gRPC over TLS), for a serve --tls-cert service (default off)",
    )
    p.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="with --tls: the certificate(s) to trust, e.g. the service's self-signed one (default: the system's)",
    )
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders of them (sent in order)")
    p.add_argument(
        "--concurrency",
        type=POSITIVE,
        action="append",
        help="requests in flight; repeat for one run per level (default 1 and 8)",
    )
    p.add_argument("--requests", type=POSITIVE, default=200, help="requests per run at most (default 200)")
    p.add_argument("--duration", type=POSITIVE_FLOAT, default=60.0, help="seconds per run at most (default 60)")
    p.add_argument("--timeout", type=POSITIVE_FLOAT, default=60.0, help="seconds one request may take (default 60)")
    p.add_argument(
        "--metrics-url",
        default=None,
        help="HOST:PORT of Triton's metrics endpoint (default: the host of --url, port 8002)",
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint the service was built from (the reference's projector, tokens)"
    )
    p.add_argument(
        "--backend",
        choices=["onnx", "torch", "trt"],
        default="onnx",
        help="backend of the in-process reference embedder (default onnx)",
    )
    p.add_argument(
        "--artifacts",
        nargs="*",
        default=[],
        help="for --backend onnx/trt: the 728 and 504 files the service serves (default none)",
    )
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider (default cpu)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="also measure the in-process embedder on the same images in the same run (default off)",
    )
    p.add_argument(
        "--cache-mb",
        type=NON_NEGATIVE_FLOAT,
        default=0.0,
        help="embedding cache of the --in-process embedder in MiB; match the server's (default 0 = off)",
    )
    p.add_argument(
        "--tolerance",
        type=POSITIVE_FLOAT,
        default=1e-2,
        help="max relative L2 distance of an answer's features from the reference (default 0.01)",
    )
    p.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="warm-up requests with generated images (default 2)")
    p.add_argument(
        "--rounds",
        type=POSITIVE,
        default=1,
        help="with --in-process: alternate served and in-process blocks this many times per level, so load "
        "changes on a shared machine hit both alike (default 1)",
    )
    p.add_argument(
        "--rate",
        type=POSITIVE_FLOAT,
        action="append",
        help="open loop: send this many requests per second for --duration whatever the answers, each with the "
        "deadline --timeout, and report goodput; repeat for one run per rate (default: closed loop, --concurrency)",
    )
    p.add_argument(
        "--retry",
        action="store_true",
        help="the client retries refusals (UNAVAILABLE) and connection errors with backoff within --timeout, as "
        "EmbedClient does by default (default off: one try per request, so the report shows every refusal)",
    )
    p.add_argument("--json", default=None, help="write the report here, atomically (default none)")
    _add_common(p)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Third-party chatter (torch.onnx's registration notes, deprecation warnings): errors only
    # unless --verbose.
    # torch's ONNX exporter registration ("torchvision is not installed. Skipping torchvision::nms" x20):
    # named explicitly because importing torch resets the levels of its registered loggers (torch.onnx).
    for noisy in (
        "torch",
        "torch.onnx._internal.exporter._registration",
        "onnxscript",
        "onnx_ir",
        "polygraphy",
        "transformers",
    ):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    progress = not args.quiet
    try:
        return COMMANDS[args.command](args, progress)
    except ThresholdError as exc:
        print(f"step37-deploy: {_one_line(exc)}", file=sys.stderr)
        return EXIT_THRESHOLD
    except ServerCrashed as exc:
        print(f"step37-deploy: crash: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CRASH
    except Step37Error as exc:
        print(f"step37-deploy: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("step37-deploy: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (run with --verbose for the traceback)"
        print(f"step37-deploy: internal error: {type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_INTERNAL


def _cmd_make_checkpoint(args: argparse.Namespace, progress: bool) -> int:
    from .synthetic import make_checkpoint

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


def _cmd_export(args: argparse.Namespace, progress: bool) -> int:
    from .export import DEFAULT_OPSET, export_onnx
    from .model import PrecisionPolicy

    policy = PrecisionPolicy(residual_fp32=args.fp32_residual, softmax_fp32=not args.fp16_softmax)
    for res in args.resolution or [728, 504]:
        r = export_onnx(
            args.checkpoint,
            args.out,
            args.precision,
            res,
            args.opset if args.opset is not None else DEFAULT_OPSET,
            policy=policy,
            progress=progress,
            input_kind=args.input,
            **_calibration_kwargs(args),
        )
        print(r.onnx_path)
    return 0


def _reference_and_projector(checkpoint: str, progress: bool = False):
    from .backends import TorchRunner, load_torch_model
    from .checkpoint import load_projector

    ref = TorchRunner(load_torch_model(checkpoint, "fp32", progress=progress), name="torch-fp32")
    proj = load_projector(checkpoint, "fp32")
    bias = proj.bias.detach().numpy() if proj.bias is not None else None
    return ref, proj.weight.detach().numpy(), bias


def _check_report_path(args: argparse.Namespace, keys: set[str]) -> None:
    """``--json``: a writable file that is none of the command's inputs and, if it exists, a report
    of this command (JSON with ``keys``), checked before any work."""
    from .files import check_output_file, check_replaceable_json, refuse_inputs

    if args.json:
        check_output_file(args.json, "--json")
        refuse_inputs(
            {"--json": args.json},
            {
                "--checkpoint": args.checkpoint,
                "--onnx": args.onnx,
                "--engine": args.engine,
                "--images": getattr(args, "images", None) or [],
            },
        )
        check_replaceable_json(args.json, "--json", keys)


def _cmd_compare(args: argparse.Namespace, progress: bool) -> int:
    from .backends.factory import runners_from_args
    from .compare import DEFAULT_THRESHOLDS, Thresholds, check, compare

    if not (args.onnx or args.engine or args.torch):
        raise UsageError("compare: give at least one --onnx, --engine or --torch")
    _check_report_path(args, {"passed", "rows"})
    if args.per_block and len(args.onnx) != 1:
        raise UsageError(f"--per-block compares one ONNX file block by block; {len(args.onnx)} --onnx given")
    thresholds = None
    if args.cos_min is not None or args.rel_l2 is not None:
        thresholds = {
            k: Thresholds(
                args.cos_min if args.cos_min is not None else v.cos_min,
                args.rel_l2 if args.rel_l2 is not None else v.rel_l2,
            )
            for k, v in DEFAULT_THRESHOLDS.items()
        }
    runners = runners_from_args(args)  # after the thresholds: a bad --cos-min fails before any loading
    ref, w, b = _reference_and_projector(args.checkpoint, progress)
    report = compare(
        ref, runners, w, b, args.batch or [1, 3], args.resolution, args.seed, args.images, thresholds, progress
    )
    print(report.table())
    if args.per_block:
        from .compare import per_block_table

        report.per_block = _per_block(args, ref)
        print(per_block_table(report.per_block))
    if args.json:
        report.write_json(args.json)
    check(report)
    return 0


def _per_block(args: argparse.Namespace, ref) -> dict:
    from .compare import case_views, per_block
    from .export import read_metadata

    meta = read_metadata(args.onnx[0])
    res = int(meta.get("resolution") or (args.resolution or [728])[0])
    x = case_views(res, (args.batch or [1])[0], args.seed, args.images)
    return per_block(args.onnx[0], ref.activate().model, x, args.provider, args.threads)


def _cmd_pipeline(args: argparse.Namespace, progress: bool) -> int:
    from .compare import check
    from .pipeline import run_pipeline

    result = run_pipeline(
        args.checkpoint,
        args.out,
        tuple(args.precision or ("fp32", "fp16")),
        tuple(args.resolution or (728, 504)),
        tuple(args.batch or (1, 3)),
        args.opset,
        build_engines=False if args.no_engines else None,
        progress=progress,
        input_kind=args.input,
        **_calibration_kwargs(args),
    )
    for e in result.exports:
        print(f"onnx    {e.onnx_path}")
    for p in result.engines:
        print(f"engine  {p}")
    print(result.report.table())
    print(f"report  {result.report_path}")
    check(result.report)
    return 0


def _cmd_build(args: argparse.Namespace, progress: bool) -> int:
    from .engine import BuildOptions, build_engine

    opts = BuildOptions(
        batch=args.batch,
        timing_cache=args.timing_cache,
        workspace_gib=args.workspace,
        opt_level=args.opt_level,
        compute_capabilities=args.compute_capability,
        require_fp16=not args.allow_fp32,
    )
    manifest = build_engine(args.onnx, args.out, opts, progress=progress)
    print(json.dumps(manifest, indent=2))
    return 0


def _cmd_inspect(args: argparse.Namespace, progress: bool) -> int:
    from .engine import inspect_engine

    print(inspect_engine(args.engine))
    return 0


def _cmd_bench(args: argparse.Namespace, progress: bool) -> int:
    from .bench import run_bench

    _check_report_path(args, {"timings", "notes"})
    result = run_bench(args, progress)
    print(result.table())
    if args.json:
        result.write_json(args.json)
    return 0


def _cmd_embed(args: argparse.Namespace, progress: bool) -> int:
    from .runtime import embed_command

    embed_command(args, progress)
    return 0


def _cmd_loadtest(args: argparse.Namespace, progress: bool) -> int:
    from .serving import require_serve_extra

    require_serve_extra("loadtest", f"tritonclient.{args.protocol}", "prometheus_client")
    from .serving.loadtest import LoadtestOptions, run_loadtest

    opts = LoadtestOptions(
        url=args.url,
        images=args.images,
        checkpoint=args.checkpoint,
        protocol=args.protocol,
        api_key_file=args.api_key_file,
        tls=args.tls or args.tls_ca is not None,
        tls_ca=args.tls_ca,
        backend=args.backend,
        artifacts=args.artifacts,
        provider=args.provider,
        concurrency=args.concurrency or [1, 8],
        requests=args.requests,
        duration_s=args.duration,
        timeout_s=args.timeout,
        metrics_url=args.metrics_url,
        in_process=args.in_process,
        cache_mb=args.cache_mb,
        tolerance=args.tolerance,
        warmup=args.warmup,
        rounds=args.rounds,
        rates=args.rate or (),
        retry=args.retry,
    )
    report = run_loadtest(opts, progress)
    print(report.table())
    if args.json:
        report.write_json(args.json)
    return 0 if report.ok else 1


def _cmd_triton_repo(args: argparse.Namespace, progress: bool) -> int:
    from .serving import require_serve_extra

    require_serve_extra("triton-repo", "tritonclient.grpc")
    from .serving.repository import write_repository

    out = write_repository(
        args.checkpoint, args.backend, args.artifacts, args.out, _repository_options(args), overwrite=args.overwrite
    )
    print(out)
    return 0


def _cmd_serve(args: argparse.Namespace, progress: bool) -> int:
    from .serving import require_serve_extra

    require_serve_extra("serve", "tritonclient.grpc", *(() if args.tritonserver else ("pytriton",)))
    from .serving.gateway import GatewayOptions
    from .serving.server import serve

    return serve(
        args.checkpoint,
        args.backend,
        args.artifacts,
        _repository_options(args),
        host=args.host,
        http_port=args.http_port or None,
        grpc_port=args.grpc_port or None,
        metrics_port=args.metrics_port or None,
        tritonserver=args.tritonserver,
        exit_timeout_s=args.exit_timeout,
        ready_timeout_s=args.ready_timeout,
        log_verbose=args.log_verbose,
        gateway=not args.no_gateway,
        limits=GatewayOptions(
            max_body_mb=args.max_body_mb, max_connections=args.max_connections, idle_timeout_s=args.idle_timeout_s
        ),
        api_key_file=args.api_key_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        allow_shared_memory=args.allow_shared_memory,
    )


def _cmd_handoff(args: argparse.Namespace, progress: bool) -> int:
    if args.target == "sglang":
        from .handoff.sglang import handoff_command

        handoff_command(args, progress)
        print(args.out)
    return 0


COMMANDS = {
    "handoff": _cmd_handoff,
    "make-checkpoint": _cmd_make_checkpoint,
    "export": _cmd_export,
    "compare": _cmd_compare,
    "pipeline": _cmd_pipeline,
    "build": _cmd_build,
    "inspect": _cmd_inspect,
    "bench": _cmd_bench,
    "embed": _cmd_embed,
    "loadtest": _cmd_loadtest,
    "triton-repo": _cmd_triton_repo,
    "serve": _cmd_serve,
    "vllm-cache": lambda args, progress: _handoff("cache_command", args),
    "epd-router": lambda args, progress: _handoff("router_command", args),
}


def _handoff(name: str, args: argparse.Namespace) -> int:
    from .handoff import vllm

    return getattr(vllm, name)(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
