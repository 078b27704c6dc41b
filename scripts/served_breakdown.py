"""Where a served request loses time against the in-process embedder, stage by stage (issue 21).

``breakdown``: one or more real ``step37-deploy serve`` (FP32 ONNX towers, ``--cache-mb 0``) with
the stage log on (``serving/stages.py``: CLOCK_MONOTONIC stamps from the client, the embedder stub
and the tower stubs, joined by request id), measured at concurrency 1 side by side with the
in-process ``VisionEmbedder`` timing the same stages on the same photos, in alternating blocks
(``--rounds``): served through the gateway, served on Triton's own loopback port behind it (the
difference is the gateway), in process.  ``--code DIR`` (repeatable) serves from another checkout
as well, e.g. a worktree at an older commit, so a before/after comparison runs in one process on
one machine at one moment.  Every served answer is checked against the in-process one (rel L2).

``benchmark``: the issue's acceptance measurement: per preset and run, a fresh ``serve --cache-mb
0 --queue-timeout-ms 600000`` and ``step37-deploy loadtest --in-process --rounds 2 --concurrency 1 --concurrency 8
--requests 36 --tolerance 1e-4`` over gRPC; prints the served/in-process ratios of every run.

Photos: six real photographs that scikit-image ships inside its wheel (``skimage/data``: no
download), one large enough to be cut into crops; ``--images`` takes others.

    python scripts/served_breakdown.py breakdown --preset tiny [--code /tmp/before] [--rounds 3]
    python scripts/served_breakdown.py benchmark --preset tiny --preset small --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step37_deploy.serving import contract as C  # noqa: E402
from step37_deploy.serving.drivers import rel_l2  # noqa: E402  (never BLAS: see its docstring)
from step37_deploy.serving.stages import (  # noqa: E402
    SERVED_STAGES,
    STAGE_LOG_ENV,
    clock_ns,
    read_stage_log,
    served_stages,
    summarize,
)

#: scikit-image's bundled photographs (inside the wheel, not fetched): five without crops and the
#: Hubble deep field (1000x872: 4 crops + the global view).
PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg", "camera.png", "ihc.png", "hubble_deep_field.jpg")
IN_PROCESS_STAGES = ("preprocess", "tower_728", "tower_504", "tower_compute", "projector", "total")


def photos(given: list[str] | None) -> list[Path]:
    if given:
        return [Path(p) for p in given]
    try:
        import skimage
    except ImportError:
        sys.exit("no photos: pip install scikit-image (its wheel ships real photographs in skimage/data), or --images")
    folder = Path(skimage.__file__).parent / "data"
    missing = [p for p in PHOTOS if not (folder / p).is_file()]
    if missing:
        sys.exit(f"scikit-image at {folder} lacks {missing}: install a full wheel, or pass --images")
    return [folder / p for p in PHOTOS]


def artifacts(preset: str, work: Path) -> tuple[Path, list[Path]]:
    """The preset's FP32 checkpoint and its 728/504 FP32 ONNX files (made once under ``work``)."""
    ckpt, onnx = work / f"ckpt-{preset}", work / f"onnx-{preset}"
    files = [onnx / f"step37_vision_fp32_{r}.onnx" for r in (728, 504)]
    if not all(f.is_file() for f in files):
        cli = [sys.executable, "-m", "step37_deploy.cli"]
        run = dict(cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        subprocess.run(
            [
                *cli,
                "make-checkpoint",
                "--preset",
                preset,
                "--out",
                str(ckpt),
                "--dtype",
                "fp32",
                "--overwrite",
                "--quiet",
            ],
            **run,
        )
        subprocess.run(
            [
                *cli,
                "export",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(onnx),
                "--precision",
                "fp32",
                "--resolution",
                "728",
                "--resolution",
                "504",
                "--no-calibrate",
                "--quiet",
            ],
            **run,
        )
    return ckpt, files


class Served:
    """One ``serve`` subprocess on loopback, free ports; ``direct`` is Triton's own gRPC port behind
    the gateway (what ``--no-gateway`` would expose)."""

    def __init__(
        self,
        code: Path,
        ckpt: Path,
        files: list[Path],
        work: Path,
        extra: list[str],
        stage_log: bool,
        variant: str = "",
    ):
        from step37_deploy.serving.server import free_port

        self.code, self.log = code, work / f"serve-{os.getpid()}-{free_port()}.log"
        self.variant = variant
        words = shlex.split(variant)
        env_vars = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
        extra = [*extra, *(w for w in words if not ("=" in w and not w.startswith("-")))]
        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        self.stage_log = work / f"stages-{self.ports['grpc']}.jsonl" if stage_log else None
        cmd = [
            sys.executable,
            "-m",
            "step37_deploy.cli",
            "serve",
            "--checkpoint",
            str(ckpt),
            "--backend",
            "onnx",
            "--artifacts",
            *map(str, files),
            "--cache-mb",
            "0",
            "--host",
            "127.0.0.1",
            "--exit-timeout",
            "10",
            *(f"--{k}-port={v}" for k, v in self.ports.items()),
            *extra,
        ]
        env = dict(os.environ, PYTHONPATH=str(code), **env_vars)
        if self.stage_log is not None:
            env[STAGE_LOG_ENV] = str(self.stage_log)
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, cwd=code, env=env)

    def wait_ready(self, timeout_s: float = 600) -> None:
        from step37_deploy.serving.server import models_ready

        deadline = time.monotonic() + timeout_s
        while not models_ready(f"127.0.0.1:{self.ports['http']}"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"serve ({self.code}) did not become ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        text = self.log.read_text()
        m = re.search(r"-> Triton on 127\.0\.0\.1 ports http (\d+), grpc (\d+), metrics (\d+)", text)
        self.direct = int(m.group(2)) if m else None
        ready = [line for line in text.splitlines() if "ready:" in line or "threads" in line]
        self.settings = ready[-2:] if ready else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def drive_served(port: int, tag: str, payloads: list[bytes], refs: list, n: int, tol: float) -> dict[str, dict]:
    """``n`` requests at concurrency 1 on gRPC ``port``; request id -> client send/recv stamps."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    outs = [grpcclient.InferRequestedOutput(name) for name in C.EMBEDDER_OUTPUTS]
    stamps = {}
    try:
        for i in range(n):
            k = i % len(payloads)
            inp = grpcclient.InferInput(C.EMBEDDER_INPUT, [1], "BYTES")
            inp.set_data_from_numpy(np.array([payloads[k]], dtype=np.object_))
            rid = f"{tag}-{i}"
            send = clock_ns()
            res = client.infer(C.EMBEDDER_MODEL, [inp], outputs=outs, request_id=rid, client_timeout=300)
            feats, ids = res.as_numpy("features"), res.as_numpy("token_ids")
            stamps[rid] = {"send": send, "recv": clock_ns()}
            if list(ids) != list(refs[k].token_ids) or rel_l2(feats, refs[k].features) > tol:
                sys.exit(f"request {rid} (photo {k}): the served answer is not the in-process one")
    finally:
        client.close()
    return stamps


def drive_in_process(embedder, payloads: list[bytes], n: int) -> list[dict[str, float]]:
    """The in-process embedder's stages (``VisionEmbedder._embed_uncached`` step by step) per image."""
    from step37_deploy.preprocess import as_pixel_dtype, preprocess
    from step37_deploy.runtime import _per_image

    rows = []
    for i in range(n):
        t0 = clock_ns()
        pre = preprocess(payloads[i % len(payloads)], embedder.pcfg, pixel_dtype=embedder.pixel_dtype)
        t1 = clock_ns()
        g = embedder.encode(as_pixel_dtype(pre.global_view[None], embedder.global_runner.input_spec().dtype))
        t2 = clock_ns()
        c = (
            embedder.encode(as_pixel_dtype(pre.crops, embedder.crop_runner.input_spec().dtype))
            if pre.num_crops
            else None
        )
        t3 = clock_ns()
        _per_image([pre], embedder._project(g), embedder._project(c) if c is not None else None)
        t4 = clock_ns()
        row = {
            "preprocess": (t1 - t0) / 1e6,
            "tower_728": (t2 - t1) / 1e6,
            "tower_compute": (t3 - t1) / 1e6,
            "projector": (t4 - t3) / 1e6,
            "total": (t4 - t0) / 1e6,
        }
        if c is not None:
            row["tower_504"] = (t3 - t2) / 1e6
        rows.append(row)
    return rows


def triton_stats(port: int) -> dict[str, dict[str, tuple[int, int]]]:
    """Triton's cumulative per-model statistics: {model: {part: (count, ns)}}."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        out = {}  # every model the server has: the towers only under --tower-calls bls
        for entry in client.get_inference_statistics("", as_json=True)["model_stats"]:
            st = entry["inference_stats"]
            out[entry["name"]] = {k: (int(v.get("count", 0)), int(v.get("ns", 0))) for k, v in st.items()}
        return out
    finally:
        client.close()


def stats_delta(a: dict, b: dict) -> dict[str, dict[str, float]]:
    """Mean ms per request of each part between two :func:`triton_stats` snapshots."""
    out = {}
    for m in b:
        out[m] = {}
        for part in ("queue", "compute_input", "compute_infer", "compute_output"):
            n = b[m][part][0] - a[m][part][0]
            out[m][part] = (b[m][part][1] - a[m][part][1]) / n / 1e6 if n else float("nan")
    return out


def tower_compute(records: list[dict]) -> dict[str, list[float]]:
    """Each tower's own compute per execution (ms), from its stage records (a tower model's, or the
    embedder's runs of the towers it holds itself under ``--tower-calls local``)."""
    out: dict[str, list[float]] = {}
    for r in records:
        if r.get("m") == "tower":
            out.setdefault(r["model"], []).append((r["infer"] - r["read"]) / 1e6)
        for run in r.get("local", []):
            out.setdefault(C.TOWER_MODELS[run["res"]], []).append((run["end"] - run["start"]) / 1e6)
    return out


def _fmt(s: dict | None) -> str:
    return f"{s['mean']:8.1f} {s['p50']:8.1f}" if s else f"{'-':>8} {'-':>8}"


def breakdown(args) -> int:
    from step37_deploy.runtime import VisionEmbedder

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, files = artifacts(args.preset, work)
    payloads = [p.read_bytes() for p in photos(args.images)]
    codes = [Path(c).resolve() for c in (args.code or [ROOT])]
    extra = shlex.split(args.serve_args)
    servers = [Served(c, ckpt, files, work, extra, True, v) for c in codes for v in (args.variant or [""])]
    try:
        for s in servers:
            s.wait_ready()
        embedder = VisionEmbedder.from_artifacts(ckpt, "onnx", files)
        refs = [embedder.embed_images([p])[0] for p in payloads]
        targets = [(f"{j}g", s, s.ports["grpc"]) for j, s in enumerate(servers)]
        targets += [(f"{j}d", s, s.direct) for j, s in enumerate(servers) if s.direct and not args.no_direct]
        for tag, _, port in targets:  # warm up (also the stubs' first-call costs)
            drive_served(port, f"warm{tag}", payloads, refs, len(payloads), args.tolerance)
        drive_in_process(embedder, payloads, len(payloads))
        load0 = os.getloadavg()
        stamps: dict[str, dict] = {tag: {} for tag, _, _ in targets}
        local: list[dict] = []
        s0 = {j: triton_stats(s.direct or s.ports["grpc"]) for j, s in enumerate(servers)}
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else targets[::-1]
            for tag, _, port in order:
                stamps[tag].update(drive_served(port, f"r{r}{tag}", payloads, refs, args.requests, args.tolerance))
            local += drive_in_process(embedder, payloads, args.requests)
        s1 = {j: triton_stats(s.direct or s.ports["grpc"]) for j, s in enumerate(servers)}
        load1 = os.getloadavg()
    finally:
        for s in servers:
            s.stop()
    report: dict = {
        "preset": args.preset,
        "photos": [str(p) for p in photos(args.images)],
        "rounds": args.rounds,
        "requests_per_block": args.requests,
        "loadavg": [load0, load1],
        "servers": [],
    }
    inproc = summarize(local, IN_PROCESS_STAGES)
    names = [n for n, _ in SERVED_STAGES]
    for j, s in enumerate(servers):
        records = read_stage_log(s.stage_log)
        entry = {
            "code": str(s.code),
            "variant": s.variant,
            "settings": s.settings,
            "triton": stats_delta(s0[j], s1[j]),
            "paths": {},
        }
        for tag, srv, _ in targets:
            if srv is s:
                entry["paths"]["gateway" if tag.endswith("g") else "direct"] = summarize(
                    served_stages(stamps[tag], records), names
                )
        entry["tower_compute_by_model"] = {
            m: summarize([{"v": v} for v in vals], ["v"])["v"] for m, vals in tower_compute(records).items()
        }
        report["servers"].append(entry)
    report["in_process"] = inproc
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def print_report(report: dict) -> None:
    la = report["loadavg"]
    print(
        f"preset {report['preset']}, {len(report['photos'])} photos, concurrency 1, {report['rounds']} rounds x "
        f"{report['requests_per_block']} requests per path; load average {la[0][0]:.2f} -> {la[1][0]:.2f}"
    )
    ip = report["in_process"]
    same = {"preprocess": "preprocess", "tower_compute": "tower_compute", "projector": "projector", "total": "total"}
    for s in report["servers"]:
        print(f"\n== serve from {s['code']} {s['variant']}")
        for line in s["settings"]:
            print("   " + line.split(": ", 1)[-1][:220])
        paths = list(s["paths"])
        head = "".join(f" {p + ' mean':>8} {'p50':>8}" for p in paths)
        print(f"{'stage':<14}{head} {'in-proc mean':>12} {'p50':>8}")
        for name, _ in SERVED_STAGES:
            cells = "".join(" " + _fmt(s["paths"][p].get(name)) for p in paths)
            print(f"{name:<14}{cells}     {_fmt(ip.get(same.get(name, '')))}")
        for m, st in s["tower_compute_by_model"].items():
            res = m.rsplit("_", 1)[-1]
            print(
                f"  {m} compute per execution: mean {st['mean']:.1f} p50 {st['p50']:.1f} ms "
                f"(in process: {_fmt(ip.get('tower_' + res)).split()[0]} mean)"
            )
        for m, parts in s["triton"].items():
            print(f"  Triton {m}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + " ms/request")
        if "gateway" in s["paths"] and "direct" in s["paths"]:
            g, d = s["paths"]["gateway"]["total"], s["paths"]["direct"]["total"]
            print(f"  gateway: total p50 {g['p50']:.1f} vs direct {d['p50']:.1f} ms ({g['p50'] - d['p50']:+.1f} ms)")
        t = s["paths"]["gateway"]["total"]
        print(f"  served/in-process p50 (gateway): {t['p50'] / ip['total']['p50']:.3f}")


def benchmark(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    images = photos(args.images)
    rows = []
    for preset in args.preset or ["tiny", "small"]:
        ckpt, files = artifacts(preset, work)
        for run in range(args.runs):
            # A long queue timeout: on a loaded machine c=8 requests wait longer than the 5 s default for
            # an embedder instance, and a refusal would fail the run instead of measuring it.
            extra = ["--queue-timeout-ms", "600000", *shlex.split(args.serve_args)]
            s = Served(Path(args.code or ROOT).resolve(), ckpt, files, work, extra, False)
            try:
                s.wait_ready()
                out = work / f"loadtest-{preset}-{run}.json"
                load0 = os.getloadavg()[0]
                cmd = [
                    sys.executable,
                    "-m",
                    "step37_deploy.cli",
                    "loadtest",
                    "--server",
                    f"127.0.0.1:{s.ports['grpc']}",
                    "--protocol",
                    "grpc",
                    "--metrics-url",
                    f"127.0.0.1:{s.ports['metrics']}",
                    "--images",
                    *map(str, images),
                    "--checkpoint",
                    str(ckpt),
                    "--artifacts",
                    *map(str, files),
                    "--in-process",
                    "--rounds",
                    "2",
                    "--concurrency",
                    "1",
                    "--concurrency",
                    "8",
                    "--requests",
                    str(args.requests),
                    "--tolerance",
                    "1e-4",
                    "--timeout",
                    "600",
                    "--duration",
                    "3600",
                    "--quiet",
                    "--json",
                    str(out),
                ]
                rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode
                load1 = os.getloadavg()[0]
            finally:
                s.stop()
            if rc != 0:
                print(f"loadtest failed (exit {rc}): see {out}")
                return rc
            for r in json.loads(out.read_text())["runs"]:
                rows.append(
                    (
                        preset,
                        run + 1,
                        r["concurrency"],
                        r["latency_ms"]["p50"],
                        r["in_process"]["latency_ms"]["p50"],
                        r["throughput_ips"],
                        r["in_process"]["throughput_ips"],
                        r["ratios"],
                        load0,
                        load1,
                    )
                )
    print(
        f"{'preset':<6} {'run':>3} {'conc':>4} {'served p50':>10} {'in-proc p50':>11} {'served/s':>8} {'in-proc/s':>9} "
        f"{'p50 ratio':>9} {'tput ratio':>10}  load avg"
    )
    for p, run, c, sp, ip, st, it, ratio, l0, l1 in rows:
        print(
            f"{p:<6} {run:>3} {c:>4} {sp:>10.1f} {ip:>11.1f} {st:>8.2f} {it:>9.2f} "
            f"{ratio['p50_served_over_in_process']:>9.3f} {ratio['throughput_served_over_in_process']:>10.3f}  "
            f"{l0:.2f} -> {l1:.2f}"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("breakdown", "benchmark"):
        p = sub.add_parser(name)
        p.add_argument(
            "--work",
            default=os.path.join(tempfile.gettempdir(), "step37-served-breakdown"),
            help="checkpoints, ONNX files, logs (reused; default $TMPDIR/step37-served-breakdown)",
        )
        p.add_argument("--images", nargs="+", help="photos (default: scikit-image's bundled photographs)")
        p.add_argument("--serve-args", default="", help="extra serve options, one string (default none)")
        p.add_argument("--tolerance", type=float, default=1e-4, help="rel L2 of an answer (default 1e-4)")
    b = sub.choices["breakdown"]
    b.add_argument("--preset", default="tiny", choices=("tiny", "small"), help="synthetic checkpoint (default tiny)")
    b.add_argument("--code", action="append", help="checkout to serve from; repeat to compare (default this one)")
    b.add_argument(
        "--variant",
        action="append",
        help="one more server per variant: ENV=VALUE words go to its environment, the rest to serve (default one)",
    )
    b.add_argument("--rounds", type=int, default=3, help="alternating blocks per path (default 3)")
    b.add_argument("--requests", type=int, default=12, help="requests per block (default 12)")
    b.add_argument("--no-direct", action="store_true", help="skip Triton's direct port (default: measure it)")
    b.add_argument("--json", help="write the report here (default none)")
    m = sub.choices["benchmark"]
    m.add_argument("--preset", action="append", choices=("tiny", "small"), help="repeatable (default tiny, small)")
    m.add_argument("--runs", type=int, default=3, help="fresh serve + loadtest per preset (default 3)")
    m.add_argument("--requests", type=int, default=36, help="requests per level (default 36)")
    m.add_argument("--code", help="checkout to serve from (default this one)")
    args = ap.parse_args()
    return breakdown(args) if args.cmd == "breakdown" else benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
