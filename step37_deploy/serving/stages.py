"""Where one served request spends its time: per-request stage stamps from inside the stubs.

Triton's statistics give a model's queue and compute time, not what happens inside a Python
model's ``execute``: decoding and preprocessing, building the BLS tensors, the towers' own input
and output copies, the projector.  When the server's environment names a file in
:data:`STAGE_LOG_ENV` (``serve`` passes its environment on to tritonserver and every stub), the
embedder and the towers append one JSON line per request to it, with ``CLOCK_MONOTONIC`` stamps in
nanoseconds: one clock for every process on the host, so a client's send and receive times line up
with the stubs'.  Unset (production), nothing is recorded and each would-be stamp costs one
attribute test.

The records are joined by request id: the client sends one (``request_id`` of a KServe request),
the embedder tags its BLS requests ``<id>/<resolution>/<chunk>``, and the towers log the ids of the
batch they ran.  :func:`served_stages` turns the joined records into stage durations;
``scripts/served_breakdown.py`` drives a server, times the same stages in process, and prints both.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: The server environment variable naming the stage log (JSON lines, appended; off when unset).
STAGE_LOG_ENV = "STEP37_STAGE_LOG"


def clock_ns() -> int:
    """``CLOCK_MONOTONIC`` in ns: the same clock in the client, tritonserver and every stub."""
    return time.monotonic_ns()


class StageLog:
    """Appends one JSON record per line (``O_APPEND``: lines of concurrent stubs never interleave)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StageLog | None:
        """The log the environment names, or None (the default: nothing recorded)."""
        path = (os.environ if environ is None else environ).get(STAGE_LOG_ENV)
        return cls(path) if path else None

    def write(self, record: Mapping[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def read_stage_log(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a stage log (a torn last line, from a stub killed mid-write, is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


#: The served stages, in the order a request goes through them (``scripts/served_breakdown.py``
#: prints them in this order).  Each is the time between two stamps of the joined records.
SERVED_STAGES = (
    ("front", "client send -> embedder execute: gateway, gRPC decode, Triton queue, hand-off to the stub"),
    ("input", "embedder reads the image bytes"),
    ("preprocess", "decode, resize, crops, normalise (embedder)"),
    ("bls_send", "embedder builds the tower request (copy into shared memory) -> tower execute: BLS, tower queue"),
    ("tower_input", "tower reads its views (as_numpy, concatenate)"),
    ("tower_compute", "the tower's runner (ONNX Runtime / torch) in its stub, or in the embedder's (local)"),
    ("tower_output", "tower builds its answer (copy into shared memory)"),
    ("bls_return", "tower answer -> embedder holds the rows as numpy: BLS return and its copies"),
    ("projector", "the projector and the rows in token order (embedder)"),
    ("answer", "embedder builds its answer tensors"),
    ("back", "embedder answer -> client holds numpy: Triton output copy, gRPC encode, gateway, client decode"),
    ("total", "client send -> client holds the answer"),
)


def _ms(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else (b - a) / 1e6


def served_stages(
    client: Mapping[str, Mapping[str, int]], records: Iterable[Mapping[str, Any]]
) -> list[dict[str, float | None]]:
    """Stage durations in ms (:data:`SERVED_STAGES`) of every request in ``client`` (request id ->
    ``{"send": ns, "recv": ns}``) that has an embedder record.  The towers run side by side, so the
    tower stages are those of the tower that answered last (the request waits for it).  Towers the
    embedder runs itself (``--tower-calls local``, its ``local`` stamps) run one after the other:
    their compute is the sum of their runs, and no BLS stage exists."""
    embedder: dict[str, Mapping[str, Any]] = {}
    towers: dict[str, Mapping[str, Any]] = {}
    for r in records:
        if r.get("m") == "embedder":
            embedder[r["id"]] = r
        elif r.get("m") == "tower":
            for bls_id in r["ids"]:
                towers[bls_id] = r
    out = []
    for rid, c in client.items():
        e = embedder.get(rid)
        if e is None:
            continue
        calls = [b for b in e.get("bls", []) if b["id"] in towers]
        row: dict[str, float | None] = {
            "front": _ms(c["send"], e["exec"]),
            "input": _ms(e["exec"], e["read"]),
            "preprocess": _ms(e["read"], e["pre"]),
            "answer": _ms(e["proj"], e["built"]),
            "back": _ms(e["built"], c["recv"]),
            "total": _ms(c["send"], c["recv"]),
        }
        if calls:
            last = max(calls, key=lambda b: b["numpy"])
            t = towers[last["id"]]
            row.update(
                bls_send=_ms(last["sent"], t["exec"]),
                tower_input=_ms(t["exec"], t["read"]),
                tower_compute=_ms(t["read"], t["infer"]),
                tower_output=_ms(t["infer"], t["built"]),
                bls_return=_ms(t["built"], last["numpy"]),
                projector=_ms(max(b["numpy"] for b in e["bls"]), e["proj"]),
            )
        elif e.get("local"):
            runs = e["local"]
            row.update(
                tower_compute=sum(_ms(x["start"], x["end"]) for x in runs),
                projector=_ms(max(x["end"] for x in runs), e["proj"]),
            )
        else:
            row.update(projector=_ms(e["pre"], e["proj"]))
        out.append(row)
    return out


def summarize(rows: Iterable[Mapping[str, float | None]], names: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per stage: mean and p50 in ms over the rows that have it, and how many do."""
    import numpy as np

    rows = list(rows)
    out = {}
    for n in names:
        vals = [r[n] for r in rows if r.get(n) is not None]
        if vals:
            out[n] = {"mean": float(np.mean(vals)), "p50": float(np.median(vals)), "n": len(vals)}
    return out
