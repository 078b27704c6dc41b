"""Resume exactly once (issue 23): ``embed-corpus`` SIGKILLed at five different points, each run
resuming the last, ends with shards bit-identical to an uninterrupted run, every key once, and no
temporary left.

The kill points are the job's own (``STEP37_CORPUS_KILL_AT``: the process SIGKILLs itself there), so
each kill lands exactly where it is meant to, with no sleeping: before any shard, in the middle of
writing a shard, with a shard written but not renamed, renamed but without its manifest, and after
a manifest with shards still to do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from step37_deploy import files
from step37_deploy.corpus.job import KILL_ENV
from step37_deploy.corpus.reader import read_shard
from tests.corpus_data import image_text_corpus, photo_dir

pytestmark = pytest.mark.skipif(photo_dir() is None, reason="scikit-image's bundled photos are not installed ([dev])")

REPO = Path(__file__).resolve().parents[1]

#: (kill point, what the output folder holds right after the kill)
KILLS = [
    ("start", lambda names: names == set()),
    ("member@2", lambda names: any(files.TMP_MARK in n for n in names) and not any(n.endswith(".tar") for n in names)),
    ("before-rename", lambda names: not any(n.endswith(".tar") for n in names if files.TMP_MARK not in n)),
    ("after-rename", lambda names: "data-000000.tar" in names and "data-000000.manifest.json" not in names),
    ("after-manifest@2", lambda names: "data-000001.manifest.json" in names and "data-000002.tar" not in names),
]


def run(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    cmd = [sys.executable, "-m", "step37_deploy.cli", "embed-corpus", *args, "--quiet"]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


def test_killed_five_times_then_resumed_is_bit_identical(tiny_fp32, tmp_path):
    corpus = image_text_corpus(tmp_path / "in", shards=3, per_shard=3, seed=7)
    common = [*map(str, corpus), "--checkpoint", str(tiny_fp32), "--outputs", "vision_features", "features"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    done = run([*common, "--out", str(ref)])
    assert done.returncode == 0, done.stderr
    for point, expect in KILLS:
        p = run([*common, "--out", str(out)], kill_at=point)
        assert p.returncode == -signal.SIGKILL, (point, p.returncode, p.stderr)
        names = set(os.listdir(out)) if out.exists() else set()
        assert expect(names), (point, sorted(names))
    final = run([*common, "--out", str(out)])
    assert final.returncode == 0, final.stderr
    assert "3/3 shards complete" in final.stdout and "9 ok, 0 errors" in final.stdout
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))  # no temporaries
    for shard in corpus:
        assert (out / shard.name).read_bytes() == (ref / shard.name).read_bytes(), shard.name
        keys = [x.key for x in read_shard(out / shard.name)]
        assert len(keys) == len(set(keys)) == 3
        a, b = (json.loads((d / shard.name.replace(".tar", ".manifest.json")).read_text()) for d in (out, ref))
        for m in (a, b):
            m.pop("written_by")
        assert a == b
