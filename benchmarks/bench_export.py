"""Benchmark: ONNX Runtime CPU latency and accuracy of fp32, our deploy model, and ORT's quantize_static.

For each subject three ONNX models run side by side in one process:

* ``fp32``: the float model, exported with the same exporter settings;
* ``deploy``: amct_opt's ``<prefix>_deploy_model.onnx`` of the quantized model;
* ``quantize_static``: ``onnxruntime.quantization.quantize_static`` on the fp32
  model (QDQ, per-channel, MinMax, after ``quant_pre_process``) with the same
  calibration batches.

Latency is the median of ``--runs`` (>= 50) timed runs after 10 warm-up runs,
at batch 1 and 32, with ``--threads`` intra-op threads (default 2) and every
graph optimization on.  Accuracy is the subject's own metric, computed through
ORT.  Subjects: the examples' MobileNetV2 on MNIST (top-1) and MiniLM sentence
encoder (mean cosine to the fp32 torch embeddings), when ``examples/`` imports.

:func:`benchmark` takes (float model, quantized model, calibration batches,
evaluation function), so any other model plugs in the same way.

Run: ``python benchmarks/bench_export.py [--subjects mobilenet_v2 minilm] [--runs 50]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from amct_opt._io import atomic_write_text
from amct_opt.calibration import calibrate
from amct_opt.config import QuantConfig
from amct_opt.create_config import create_quant_config
from amct_opt.export import export_float_model, export_models
from amct_opt.export.ort_check import INTEGER_OPS, op_counts, optimized_model
from amct_opt.fusion import find_conv_bn_pairs, fold_conv_bn
from amct_opt.quant_model import QuantizedModel, build_quantized_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_export.md"
BATCH_SIZES = (1, 32)
logger = logging.getLogger("bench_export")
WARMUP = 10

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Evaluation:
    """Evaluation batches and the metric of the outputs of all of them (concatenated)."""

    batches: Sequence[Batch]
    score: Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Row:
    """One model of one subject: how fast it runs, how accurate it is."""

    subject: str
    variant: str
    latency_ms: dict[int, float]
    metric: float
    integer_ops: int


@dataclass(frozen=True)
class Agreement:
    """Deploy against fake-quant outputs: top-1 agreement and per-output cosine."""

    subject: str
    top1: float
    min_cosine: float
    mean_cosine: float


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: ort.InferenceSession, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    return {meta.name: value for meta, value in zip(session.get_inputs(), inputs)}


def _resize(batch: Batch, size: int) -> tuple[np.ndarray, ...]:
    """``batch`` repeated or cut along axis 0 to ``size`` rows."""
    out = []
    for tensor in batch:
        reps = -(-size // tensor.shape[0])
        out.append(tensor.repeat(reps, *[1] * (tensor.dim() - 1))[:size].numpy())
    return tuple(out)


def median_latency_ms(session: ort.InferenceSession, inputs: Sequence[np.ndarray], runs: int) -> float:
    """Median wall time of ``runs`` calls after :data:`WARMUP` untimed ones."""
    feed = _feed(session, inputs)
    for _ in range(WARMUP):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """The calibration batches, as ORT's quantizer reads them."""

    def __init__(self, names: Sequence[str], batches: Sequence[Batch]) -> None:
        self._feeds = iter([{n: t.numpy() for n, t in zip(names, batch)} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def ort_quantize_static(fp32: Path, out: Path, names: Sequence[str], batches: Sequence[Batch]) -> None:
    """ORT's own static QDQ quantization: per-channel, MinMax, default (int8) types."""
    prepared = out.with_name(f"{out.stem}_prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        _Reader(names, batches),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )


def library_qmodel(model: nn.Module, batches: Sequence[Batch], workdir: Path) -> QuantizedModel:
    """amct_opt's default quantization of ``model`` (its config, BN folding, calibration), all layers on."""
    config_path = workdir / "config.json"
    create_quant_config(str(config_path), model, batches[0], batch_num=len(batches))
    config = QuantConfig.load(config_path)
    folded = fold_conv_bn(model, find_conv_bn_pairs(model))
    record = calibrate(folded, config, lambda m: [m(*batch) for batch in batches])
    with torch.no_grad():
        return build_quantized_model(folded, record).eval()


def _outputs(session: ort.InferenceSession, batches: Sequence[Batch]) -> np.ndarray:
    return np.concatenate([session.run(None, _feed(session, [t.numpy() for t in b]))[0] for b in batches])


def agreement(subject: str, fake_quant: np.ndarray, deploy: np.ndarray) -> Agreement:
    cosine = (
        (fake_quant * deploy).sum(1) / np.linalg.norm(fake_quant, axis=1) / np.linalg.norm(deploy, axis=1)
    )
    top1 = float((fake_quant.argmax(1) == deploy.argmax(1)).mean())
    return Agreement(subject, top1, float(cosine.min()), float(cosine.mean()))


def benchmark(
    name: str,
    float_model: nn.Module,
    qmodel: QuantizedModel,
    calibration: Sequence[Batch],
    evaluation: Evaluation,
    input_names: Sequence[str],
    output_names: Sequence[str],
    workdir: Path,
    runs: int = 50,
    threads: int = 2,
) -> tuple[list[Row], Agreement]:
    """fp32, deploy and quantize_static ONNX models of one subject: latency and metric of each.

    Also compares the deploy model's outputs with the fake-quant model's.
    """
    axes = {n: {0: "batch"} for n in (*input_names, *output_names)}
    fp32 = workdir / f"{name}_fp32.onnx"
    export_float_model(float_model, fp32, calibration[0], input_names, output_names, axes)
    exported = export_models(
        qmodel,
        workdir / name,
        calibration[0],
        input_names,
        output_names,
        axes,
        calibration=lambda m: [m(*batch) for batch in calibration],
    )
    static = workdir / f"{name}_quantize_static.onnx"
    ort_quantize_static(fp32, static, input_names, calibration)
    rows, outputs = [], {}
    for variant, path in (("fp32", fp32), ("deploy", exported.deploy_path), ("quantize_static", static)):
        session = _session(path, threads)
        latency = {
            size: median_latency_ms(session, _resize(calibration[0], size), runs) for size in BATCH_SIZES
        }
        outputs[variant] = _outputs(session, evaluation.batches)
        counts = op_counts(optimized_model(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL))
        integer_ops = sum(counts[op] for op in INTEGER_OPS)
        rows.append(Row(name, variant, latency, evaluation.score(outputs[variant]), integer_ops))
        logger.info("%s %s: %s ms, metric %.4f", name, variant, latency, rows[-1].metric)
    fake_quant = _outputs(_session(exported.fake_quant_path, threads), evaluation.batches)
    return rows, agreement(name, fake_quant, outputs["deploy"])


# -- the examples' subjects -------------------------------------------------------------------


def _import_examples() -> None:
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))


def mobilenet_v2(workdir: Path, runs: int, threads: int) -> tuple[list[Row], Agreement]:
    """The examples' MobileNetV2 trained on MNIST digits; metric: top-1 on the 1,000 test digits."""
    _import_examples()
    from mnist_data import load_mnist
    from mobilenet_v2 import train_or_load

    data = load_mnist()
    model = train_or_load(ROOT / "examples" / ".cache", data).eval()
    batches = [(data.train_x[i : i + 64],) for i in range(0, 256, 64)]
    qmodel = library_qmodel(model, batches, workdir)
    labels = data.test_y.numpy()
    evaluation = Evaluation(
        [(data.test_x[i : i + 250],) for i in range(0, len(data.test_x), 250)],
        lambda logits: float((logits.argmax(1) == labels).mean()),
    )
    return benchmark(
        "mobilenet_v2", model, qmodel, batches, evaluation, ["input"], ["logits"], workdir, runs, threads
    )


def minilm(workdir: Path, runs: int, threads: int) -> tuple[list[Row], Agreement]:
    """The examples' MiniLM sentence encoder; metric: mean cosine to the fp32 torch embeddings."""
    _import_examples()
    from minilm_encoder import embed, load_minilm, load_sentences, tokenize

    model, tokenizer = load_minilm()
    calibration_sentences, evaluation_sentences = load_sentences()
    ids, mask = tokenize(tokenizer, calibration_sentences)
    batches = [(ids[i : i + 16], mask[i : i + 16]) for i in range(0, len(ids), 16)]
    eval_ids, eval_mask = tokenize(tokenizer, evaluation_sentences)
    reference = embed(model, eval_ids, eval_mask).numpy()
    qmodel = library_qmodel(model, batches, workdir)

    def mean_cosine(got: np.ndarray) -> float:
        cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        return float(cos.mean())

    evaluation = Evaluation(
        [(eval_ids[i : i + 64], eval_mask[i : i + 64]) for i in range(0, len(eval_ids), 64)], mean_cosine
    )
    return benchmark(
        "minilm",
        model,
        qmodel,
        batches,
        evaluation,
        ["input_ids", "attention_mask"],
        ["embedding"],
        workdir,
        runs,
        threads,
    )


SUBJECTS: dict[str, tuple[str, Callable[[Path, int, int], tuple[list[Row], Agreement]]]] = {
    "mobilenet_v2": ("top-1", mobilenet_v2),
    "minilm": ("mean cosine", minilm),
}


# -- the table --------------------------------------------------------------------------------


def table(rows: Sequence[Row], metrics: dict[str, str]) -> str:
    """Latency per batch size, speed-up over fp32, ratio to quantize_static, metric, integer kernels."""
    head = ["model", "variant"] + [f"b{b} ms" for b in BATCH_SIZES]
    head += [
        f"fp32/this b{BATCH_SIZES[-1]}",
        f"this/quantize_static b{BATCH_SIZES[-1]}",
        "metric",
        "integer ops",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {(r.subject, r.variant): r for r in rows}
    big = BATCH_SIZES[-1]
    for row in rows:
        fp32 = by_key[(row.subject, "fp32")].latency_ms[big]
        static = by_key[(row.subject, "quantize_static")].latency_ms[big]
        cells = [row.subject, row.variant] + [f"{row.latency_ms[b]:.3f}" for b in BATCH_SIZES]
        cells += [f"{fp32 / row.latency_ms[big]:.2f}x", f"{row.latency_ms[big] / static:.2f}"]
        cells += [f"{metrics[row.subject]} {row.metric:.4f}", str(row.integer_ops)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_table(agreements: Sequence[Agreement]) -> str:
    lines = ["| model | deploy vs fake-quant top-1 | min cosine | mean cosine |", "|---|---|---|---|"]
    lines += [
        f"| {a.subject} | {a.top1:.4f} | {a.min_cosine:.5f} | {a.mean_cosine:.5f} |" for a in agreements
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", nargs="+", choices=sorted(SUBJECTS), default=sorted(SUBJECTS))
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement (>= 50)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--write-results", action="store_true", help=f"also write the tables to {RESULTS}")
    args: Any = parser.parse_args(argv)
    if args.runs < 50:
        parser.error("--runs must be at least 50")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    agreements: list[Agreement] = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for subject in args.subjects:
            workdir = Path(tmp) / subject
            workdir.mkdir()
            subject_rows, subject_agreement = SUBJECTS[subject][1](workdir, args.runs, args.threads)
            rows += subject_rows
            agreements.append(subject_agreement)
    command = " ".join(["python benchmarks/bench_export.py", *(sys.argv[1:] if argv is None else argv)])
    text = (
        f"ORT {ort.__version__}, {args.threads} intra-op threads, median of {args.runs} runs after "
        f"{WARMUP} warm-up runs.\nCommand: `{command}`\n\n"
        + table(rows, {name: metric for name, (metric, _) in SUBJECTS.items()})
        + "\n\n"
        + agreement_table(agreements)
        + "\n"
    )
    print(text)
    if args.write_results:
        atomic_write_text(RESULTS, text)


if __name__ == "__main__":
    main()
