"""Deploy and fake-quant agree on a trained classifier; the examples' MobileNetV2 runs on integer kernels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import quantize, run_ort

from amct_opt.export import export_models
from amct_opt.export.ort_check import INTEGER_OPS, op_counts, optimized_model
from amct_opt.fusion import find_conv_bn_pairs, fold_conv_bn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_deploy_and_fake_quant_agree_on_a_trained_digits_classifier(trained, tmp_path: Path) -> None:
    """The suite's small CNN trained on real digits (BN folded): top-1 on >= 99.9%, mean cosine >= 0.999.

    The per-input cosine of the logits is >= 0.999 on at least 99% of the inputs too.
    """
    model = fold_conv_bn(trained.model, find_conv_bn_pairs(trained.model))
    batches = [trained.train_x[i : i + 64] for i in range(0, 256, 64)]
    qmodel = quantize(model, (torch.cat(batches),))
    paths = export_models(
        qmodel,
        tmp_path / "digits",
        (batches[0],),
        ["input"],
        ["logits"],
        {"input": [0], "logits": [0]},
        calibration=lambda m: [m(batch) for batch in batches],
    )
    fake_quant = run_ort(paths.fake_quant_path, trained.test_x)
    # The deploy model's own arithmetic (unfused): on CPUs without VNNI, ORT's u8s8 integer
    # kernels may saturate, which is a property of the CPU, not of the model (see run_ort).
    deploy = run_ort(paths.deploy_path, trained.test_x, fused=False)
    cosine = (
        (fake_quant * deploy).sum(1) / np.linalg.norm(fake_quant, axis=1) / np.linalg.norm(deploy, axis=1)
    )
    assert len(deploy) >= 1000
    assert (fake_quant.argmax(1) == deploy.argmax(1)).mean() >= 0.999
    print(f"cosine mean {cosine.mean():.6f}, min {cosine.min():.6f}, share >= 0.999: {(cosine >= 0.999).mean():.4f}")
    assert cosine.mean() >= 0.999
    assert (cosine >= 0.999).mean() >= 0.99
    counts = op_counts(optimized_model(paths.deploy_path))
    assert sum(counts[op] for op in INTEGER_OPS) == len(qmodel.layer_names)


def test_example_mobilenet_v2_runs_every_layer_on_integer_kernels(tmp_path: Path) -> None:
    """The examples' MobileNetV2 (random weights, BN folded): 19 QLinearConv + 1 QGemm, no float kernel."""
    if not (EXAMPLES / "mobilenet_v2.py").exists():
        pytest.skip("examples/mobilenet_v2.py is not there")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from mobilenet_v2 import MobileNetV2
    finally:
        sys.path.remove(str(EXAMPLES))
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    folded = fold_conv_bn(model, find_conv_bn_pairs(model))
    x = torch.randn(16, 1, 28, 28)
    qmodel = quantize(folded, (x,), per_channel_linear=False)
    paths = export_models(qmodel, tmp_path / "mbv2", (x[:4],), calibration=lambda m: m(x))
    counts = op_counts(optimized_model(paths.deploy_path))
    assert (counts["QLinearConv"], counts["QGemm"]) == (19, 1), counts
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "Clip", "Relu"} & set(counts)
    weights = [t for t in onnx.load(paths.deploy_path).graph.initializer if len(t.dims) >= 2]
    assert all(t.data_type == onnx.TensorProto.INT8 for t in weights)
