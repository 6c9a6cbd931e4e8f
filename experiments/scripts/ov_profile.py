"""Where a compiled IR spends its time: OpenVINO's per-node counters (``PERF_COUNT``) summed by node type and
kernel precision, and the slowest nodes (issue 34; log: experiments/logs/ov-profile-fast-parts.txt).

    python experiments/scripts/ov_profile.py MODEL_XML [FEATURE_SHAPE]

MODEL_XML: a cached UNet IR of the openvino backend (``~/.cache/stable_diffusion/openvino/ov*/unet-*``), run at
SD1.5's 512 px with classifier-free guidance (batch 2); FEATURE_SHAPE, for a DeepCache shallow part, the kept
feature's shape, e.g. "2,640,32,32" for SD1.5's branch 3.
"""

from __future__ import annotations

import collections
import sys

import numpy as np
import openvino as ov

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2,
          "PERF_COUNT": True}


def main() -> None:
    core = ov.Core()
    model = core.read_model(sys.argv[1])
    shapes = [[2, 4, 64, 64], [2], [2, 77, 768]]
    if len(sys.argv) > 2:
        shapes.append([int(d) for d in sys.argv[2].split(",")])
    model.reshape({port: shape for port, shape in zip(model.inputs, shapes)})
    request = core.compile_model(model, "CPU", CONFIG).create_infer_request()
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    inputs[1] = np.full([2], 500.0, np.float32)
    request.infer(inputs)
    request.infer(inputs)  # the counters of this second call
    by_kind: collections.Counter = collections.Counter()
    by_node: collections.Counter = collections.Counter()
    for node in request.profiling_info:
        seconds = node.real_time.total_seconds()
        by_kind[(node.node_type, node.exec_type)] += seconds
        by_node[node.node_name] += seconds
    total = sum(by_kind.values())
    print(f"total {total:.3f} s")
    for (kind, kernel), seconds in by_kind.most_common(15):
        print(f"{seconds:7.3f} s {100 * seconds / total:5.1f} %  {kind} ({kernel})")
    for name, seconds in by_node.most_common(12):
        print(f"{seconds:7.3f} s  {name[:110]}")


if __name__ == "__main__":
    main()
