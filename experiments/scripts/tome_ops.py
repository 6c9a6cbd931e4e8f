"""Token merging's merge and unmerge under OpenVINO: the product's (models/tome.py) against an earlier version of
the file read from git, at SD1.5's highest-resolution self-attention (batch 2, 64x64 tokens, 320 channels, ratio
0.5); the same numbers in torch (bit for bit) and their compiled time (issue 34; log: experiments/logs/tome-ops.txt).

    python experiments/scripts/tome_ops.py [COMMIT]     # COMMIT: the earlier version (default 2a05257, scatter-mean)
"""

from __future__ import annotations

import collections
import subprocess
import sys
import time
import types

import numpy as np
import openvino as ov
import torch

from stable_diffusion.models import tome

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2}


class MergeAttendUnmerge(torch.nn.Module):
    """merge -> a linear layer (standing in for the attention) -> unmerge, as a transformer block uses them."""

    def __init__(self, matching) -> None:
        super().__init__()
        self.matching, self.linear = matching, torch.nn.Linear(320, 320)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merge, unmerge = self.matching(x, 64, 64, 0.5)
        return unmerge(self.linear(merge(x)))


def version(commit: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{commit}:src/stable_diffusion/models/tome.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"tome_{commit}")
    exec(compile(source, module.__name__, "exec"), module.__dict__)  # noqa: S102 - our own file at another commit
    return module


def main() -> None:
    commit = sys.argv[1] if len(sys.argv) > 1 else "2a05257"
    torch.manual_seed(0)
    x = torch.randn(2, 4096, 320)
    core = ov.Core()
    outputs = {}
    for name, module in ((commit, version(commit)), ("now", tome)):
        model = MergeAttendUnmerge(module.bipartite_soft_matching)
        torch.manual_seed(1)
        model.linear.reset_parameters()
        with torch.no_grad():
            outputs[name] = model(x)
            converted = ov.convert_model(model, example_input=(x,))
        compiled = core.compile_model(converted, "CPU", {**CONFIG, "PERF_COUNT": True})
        request = compiled.create_infer_request()
        result = request.infer([x.numpy()])[0]
        seconds = []
        for _ in range(10):
            start = time.perf_counter()
            request.infer([x.numpy()])
            seconds.append(time.perf_counter() - start)
        by_kind: collections.Counter = collections.Counter()
        for node in request.profiling_info:
            by_kind[f"{node.node_type} ({node.exec_type})"] += node.real_time.total_seconds()
        gap = np.abs(result - outputs[name].numpy()).max()
        print(f"{name}: openvino best of 10 {1000 * min(seconds):.1f} ms (max |openvino - torch| {gap:.1e})")
        for kind, spent in by_kind.most_common(6):
            print(f"  {1000 * spent:6.2f} ms  {kind}")
    print("torch outputs equal bit for bit:", torch.equal(outputs[commit], outputs["now"]))


if __name__ == "__main__":
    main()
