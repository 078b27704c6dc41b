"""Triton Python-backend model: one vision tower (ONNX Runtime or torch runner), dynamically batched.

Triton's dynamic batcher hands ``execute`` several requests (the views of several images); they
run as one batch through the runner and each request gets its own rows back.  A failure answers
every request of that batch with an error; the model keeps serving.
"""

from __future__ import annotations

# ruff: noqa: E402
import os
import sys

# The backend stub's embedded interpreter ignores PYTHONPATH: honour it as ``python`` would, so the
# step37_deploy that ``step37-deploy serve`` runs from is the one imported here.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from step37_deploy.serving import contract as C
from step37_deploy.serving.repository import _inside
from step37_deploy.serving.stages import StageLog, clock_ns
from step37_deploy.serving.threads import SPINNING_PARAMETER, THREADS_PARAMETER, usable_cores
from step37_deploy.serving.towers import open_tower_runner


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        artifact = _inside(version_dir, params["artifact"], f"{args['model_name']} config parameter 'artifact'")
        gpu = args.get("model_instance_kind") == "GPU"
        device_id = int(args.get("model_instance_device_id") or 0)
        kind = params["step37_backend"]
        # serve writes the threads it chose (serving/threads.py); a repository written elsewhere
        # (triton-repo) gets this machine's cores.  Idle workers sleep: the cores are shared.
        threads = int(params.get(THREADS_PARAMETER) or usable_cores())
        spinning = params.get(SPINNING_PARAMETER, "0") == "1"
        in_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_input_config_by_name(config, C.TOWER_INPUT)["data_type"]
        )
        device = f"cuda:{device_id}" if gpu else "cpu"
        self.runner = open_tower_runner(kind, artifact, threads, np.dtype(in_dtype).name, spinning, device)
        self.out_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, C.TOWER_OUTPUT)["data_type"]
        )
        self.model_name = args["model_name"]
        # Per-batch stage stamps (serving/stages.py), only when the server's environment asks.
        self.stages = StageLog.from_env()

    def execute(self, requests: list) -> list:
        t_exec = clock_ns() if self.stages is not None else 0
        views = [pb_utils.get_input_tensor_by_name(r, C.TOWER_INPUT).as_numpy() for r in requests]
        try:
            batch = views[0] if len(views) == 1 else np.concatenate(views)  # one request: no copy
            t_read = clock_ns() if self.stages is not None else 0
            feats = np.asarray(self.runner.infer(batch), dtype=self.out_dtype)
        except Exception as exc:  # every request of this batch gets the error; the model keeps serving
            err = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        t_infer = clock_ns() if self.stages is not None else 0
        responses, start = [], 0
        for v in views:
            part = feats[start : start + len(v)]
            start += len(v)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(C.TOWER_OUTPUT, part)]))
        if self.stages is not None:
            self.stages.write(
                {"m": "tower", "model": self.model_name, "ids": [r.request_id() for r in requests], "views": len(feats),
                 "exec": t_exec, "read": t_read, "infer": t_infer, "built": clock_ns()}
            )  # fmt: skip
        return responses

    def finalize(self) -> None:
        self.runner.deactivate()
