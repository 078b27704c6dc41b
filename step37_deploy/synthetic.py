"""Synthetic checkpoints in the release layout, for tests and demos (no model hub here).

``make_checkpoint`` writes ``config.json``, ``tokenizer_config.json`` with the image special tokens,
sharded safetensors and ``model.safetensors.index.json``.  Vision tensors get realistic scales
(LayerNorm weights near 1, LayerScale near 0.1, fan-in scaled matrices) and every shard also holds
*decoy* language-model tensors, more bytes of them than the vision tower, so that a loader which
reads anything but the vision weights shows up in RSS, in the page cache and in the read hook.
Decoys are zeros and, where the file system can (Linux ``fallocate`` hole punching: ext4, xfs,
btrfs, tmpfs), their byte ranges are turned into holes after each shard is written: the files keep
the release layout and size, reading a decoy still costs page cache and RSS, but the disk holds
only the vision bytes (3.9 GB instead of 8.8 GB for the ``full`` preset).
The folder appears atomically: everything is written to a temporary sibling and renamed.  Its
``synthetic.json`` lists every file written: ``--overwrite`` replaces only such a folder, holding
nothing else, and refuses any other (a user's folder given by mistake is never deleted).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, parse_dtype, read_header
from .config import SPECIAL_TOKENS, Step37Config, preset
from .errors import CheckpointError, OutputError
from .files import apply_umask, check_output_dir, ensure_dir, os_reason, replace_dir, temp_sibling

log = logging.getLogger(__name__)

#: Decoy bytes relative to the vision tower's bytes.
DECOY_RATIO = 1.25
#: The marker file: what wrote the folder and every file it holds.
MARKER = "synthetic.json"
WRITTEN_BY = "step37-deploy make-checkpoint"


def vision_shapes(cfg: Step37Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for the vision tower and projector (release names, with prefixes)."""
    from .model import Step37Projector, Step37VisionModel

    with torch.device("meta"):
        vm = Step37VisionModel(cfg.vision)
        pj = Step37Projector(cfg.projector)
    shapes = {f"vision_model.{k}": tuple(v.shape) for k, v in vm.state_dict().items()}
    shapes.update({f"vit_large_projector.{k}": tuple(v.shape) for k, v in pj.state_dict().items()})
    return shapes


def _init_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A realistic FP32 value for one vision/projector tensor."""
    randn = torch.randn(shape, generator=gen)
    name = key.split(".")[-1]
    if ".ls_" in key and name == "gamma":
        return 0.1 + 0.02 * randn
    if ("ln_" in key or ".ln_" in key) and name == "weight":
        return 1.0 + 0.05 * randn
    if name == "bias" or key.endswith("in_proj_bias"):
        return 0.02 * randn
    if key.endswith("positional_embedding") or key.endswith("class_embedding"):
        return shape[-1] ** -0.5 * randn
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return fan_in**-0.5 * randn


#: Stress checkpoints (``massive_activations=True``): a few residual channels get about this much
#: (FP16's largest value is 65504), in the style reported for trained ViTs.
MASSIVE_VALUE = 2.56e5


def massive_channels(cfg: Step37Config) -> tuple[int, list[int]]:
    """(block, channels) of a stress checkpoint: the block whose MLP writes the massive channels into
    the residual stream (an early one, not the first where there are several), and the channels."""
    layers, width = cfg.vision.layers, cfg.vision.width
    block = max(1, layers // 4) if layers > 1 else 0
    return block, sorted({(37 * k + 11) % width for k in range(3)})


def _massive(key: str, t: torch.Tensor, cfg: Step37Config) -> torch.Tensor:
    """Edit one tensor of a stress checkpoint.  In the chosen block, one MLP hidden unit per massive
    channel fires at about 8 for every token (its c_fc bias; its weights keep the token-dependent
    part), c_proj routes it to the channel with weight 500 (branch output ~4000, inside FP16), and
    LayerScale 64 lifts it to ~2.6e5 in the residual stream, where it persists to the end, as
    massive activations do.  ``vit_downsampler1`` weighs those channels down (trained models learn
    to treat them as a bias) so the features are not a copy of them."""
    block, channels = massive_channels(cfg)
    units = [cfg.vision.mlp_dim - 1 - k for k in range(len(channels))]
    p = f"vision_model.transformer.resblocks.{block}."
    if key == p + "mlp.c_fc.bias":
        t[units] = 8.0
    elif key == p + "mlp.c_proj.weight":
        t[:, units] = 0.0
        t[channels, units] = 500.0
    elif key == p + "ls_2.gamma":
        t[channels] = MASSIVE_VALUE / 4000.0
    elif key == "vision_model.vit_downsampler1.weight":
        t[:, channels] *= 1e-3
    return t


def _decoys(cfg: Step37Config, vision_bytes: int, itemsize: int, ratio: float) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Language-model-like tensor names and shapes totalling about ``ratio`` x the vision bytes."""
    hidden = cfg.text_hidden_size
    vocab = max(1024, 8 * hidden)
    budget = int(ratio * vision_bytes) // itemsize
    if budget <= 0:
        return
    yield "model.embed_tokens.weight", (vocab, hidden)
    yield "lm_head.weight", (vocab, hidden)
    budget -= 2 * vocab * hidden
    layer = 0
    inter = max(hidden, int(2.75 * hidden))
    while budget > 0:
        yield f"model.layers.{layer}.mlp.down_proj.weight", (hidden, inter)
        yield f"model.layers.{layer}.self_attn.o_proj.weight", (hidden, hidden)
        budget -= hidden * inter + hidden * hidden
        layer += 1


def _tokenizer_config(cfg: Step37Config) -> dict:
    ids = cfg.tokens.by_token()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(ids[tok]): {"content": tok, "special": True, "lstrip": False, "rstrip": False, "normalized": False}
            for tok in SPECIAL_TOKENS
        },
    }


def make_checkpoint(
    out: str | Path,
    preset_name: str = "tiny",
    dtype: str = "bf16",
    shards: int = 2,
    seed: int = 0,
    cfg: Step37Config | None = None,
    progress: bool = False,
    overwrite: bool = False,
    decoy_ratio: float = DECOY_RATIO,
    massive_activations: bool = False,
) -> Path:
    """Write a synthetic checkpoint for ``preset_name`` (or ``cfg``) to ``out``; returns ``out``.

    ``decoy_ratio`` sets the decoy language-model bytes relative to the vision bytes (0 writes
    none).  The free space next to ``out`` is checked before anything is written: a release-size
    checkpoint is several GB, and running out of disk halfway would only waste minutes.
    ``massive_activations`` writes a stress checkpoint (:func:`_massive`): a few residual channels
    far above FP16's range, which the FP16 export's calibration must find and protect.
    """
    cfg = cfg or preset(preset_name)
    tdtype = parse_dtype(dtype)
    out = Path(out)
    if shards < 1:
        raise CheckpointError(f"--shards must be >= 1, got {shards}")
    if not 0 <= decoy_ratio <= 100:
        raise CheckpointError(f"decoy ratio must be in [0, 100], got {decoy_ratio}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"--out {out} already exists; remove it or pass --overwrite")
        check_replaceable(out)
    check_output_dir(out.parent, "--out", out)
    ensure_dir(out.parent, f"--out {out}")
    itemsize = torch.empty((), dtype=tdtype).element_size()

    real = vision_shapes(cfg)
    vision_bytes = sum(math.prod(s) for s in real.values()) * itemsize
    decoys = dict(_decoys(cfg, vision_bytes, itemsize, decoy_ratio))
    # Interleave decoys between real tensors so that every shard mixes both kinds.
    entries: list[tuple[str, tuple[int, ...], bool]] = []
    real_items, decoy_items = list(real.items()), list(decoys.items())
    step = max(1, len(real_items) // max(1, len(decoy_items)))
    for i, (k, s) in enumerate(real_items):
        entries.append((k, s, True))
        if i % step == 0 and decoy_items:
            dk, ds = decoy_items.pop(0)
            entries.append((dk, ds, False))
    entries.extend((k, s, False) for k, s in decoy_items)

    total = sum(math.prod(s) for _, s, _ in entries) * itemsize
    per_shard = total / shards
    groups: list[list[tuple[str, tuple[int, ...], bool]]] = [[]]
    acc = 0
    for entry in entries:
        if acc >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(entry)
        acc += math.prod(entry[1]) * itemsize
    while len(groups) < shards:  # tiny configs: keep the requested shard count
        groups.append([])

    # With holes punched, the disk holds the vision bytes plus one shard's decoys at a time.
    shard_decoys = [sum(math.prod(sh) for _, sh, real in g if not real) * itemsize for g in groups]
    check_free_space(out.parent, total - sum(shard_decoys) + max(shard_decoys))
    sparse = True
    tmp = temp_sibling(out, directory=True)
    try:
        gen = torch.Generator().manual_seed(seed)
        weight_map: dict[str, str] = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {preset_name} checkpoint")
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            tensors = {}
            for key, shape, is_real in group:
                # decoys are zeros: never read, and punched into holes below
                if is_real:
                    value = _init_tensor(key, shape, gen)
                    tensors[key] = (_massive(key, value, cfg) if massive_activations else value).to(tdtype)
                else:
                    tensors[key] = torch.zeros(shape, dtype=tdtype)
                weight_map[key] = fname
            if not tensors:  # a shard must hold something: a tiny decoy
                key = f"model.layers.pad{i}.weight"
                tensors[key] = torch.zeros(8, dtype=tdtype)
                weight_map[key] = fname
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            apply_umask(tmp / fname)  # safetensors creates 0600
            if sparse and not punch_holes(tmp / fname, [k for k, _, real in group if not real]):
                sparse = False  # this file system keeps the zeros: the rest must fit in full
                check_free_space(tmp, sum(math.prod(sh) for g in groups[i + 1 :] for _, sh, _ in g) * itemsize)
            if bar is not None:
                bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
            del tensors
        if bar is not None:
            bar.close()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(cfg), indent=2))
        files = sorted([*(p.name for p in tmp.iterdir()), MARKER])
        marker = {
            "written_by": WRITTEN_BY,
            "preset": preset_name,
            "dtype": dtype,
            "seed": seed,
            "shards": shards,
            "massive_activations": massive_activations,
        }
        (tmp / MARKER).write_text(json.dumps({**marker, "files": files}, indent=2))
        if out.exists():
            log.warning("replacing %s, a synthetic checkpoint this tool wrote (%s)", out, _describe(out))
        replace_dir(tmp, out)
    except OSError as exc:
        raise OutputError(f"could not write the checkpoint {out}: {os_reason(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote synthetic %s checkpoint to %s (%d shards, %.1f MB)", preset_name, out, shards, total / 1e6)
    return out


def _marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("written_by") == WRITTEN_BY and isinstance(data.get("files"), list)
    return data if ok else None


def _describe(folder: Path) -> str:
    m = _marker(folder) or {}
    return f"preset {m.get('preset')}, {m.get('dtype')}, {len(m.get('files', []))} files"


def check_replaceable(out: Path) -> None:
    """``--overwrite`` may replace ``out`` only when this tool wrote it and it holds nothing else."""
    if out.is_symlink() or not out.is_dir():
        raise OutputError(
            f"--out {out} is not a folder this tool wrote (it is a file or a link): refusing to replace it"
        )
    marker = _marker(out)
    if marker is None:
        raise OutputError(
            f"--out {out} was not written by step37-deploy make-checkpoint (no valid {MARKER}): "
            "refusing to replace it; choose another folder or remove it yourself"
        )
    try:
        extra = sorted(set(os.listdir(out)) - set(marker["files"]))
    except OSError as exc:
        raise OutputError(f"--out {out} cannot be listed: {os_reason(exc)}") from exc
    if extra:
        raise OutputError(
            f"--out {out} holds files this tool did not write ({', '.join(extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}): refusing to replace it"
        )


#: Head room kept free beside a new checkpoint (the JSON files, the file system's own needs).
FREE_SPACE_MARGIN = 256 << 20


def check_free_space(folder: Path, nbytes: int) -> None:
    """Raise ``CheckpointError`` when ``folder`` lacks room for ``nbytes`` plus a margin."""
    free = shutil.disk_usage(folder).free
    if free < nbytes + FREE_SPACE_MARGIN:
        raise CheckpointError(
            f"not enough disk space in {folder}: the checkpoint needs {nbytes / 1e9:.2f} GB "
            f"(+{FREE_SPACE_MARGIN / 1e9:.2f} GB margin), {free / 1e9:.2f} GB free"
        )


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_holes(path: Path, keys: list[str]) -> bool:
    """Turn the byte ranges of tensors ``keys`` (zeros already, so the content does not change) of a
    written safetensors file into holes.  False where the platform or file system cannot."""
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    start, header = read_header(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        for key in keys:
            a, b = header[key]["data_offsets"]
            if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start + a, b - a) != 0:
                err = ctypes.get_errno()
                if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return False
                raise OSError(err, f"fallocate(PUNCH_HOLE) failed on {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
    return True
