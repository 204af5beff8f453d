"""Benchmark: ONNX Runtime CPU latency and accuracy of fp32, our deploy model, and ORT's quantize_static.

For each subject these ONNX models run side by side in one process:

* ``fp32``: the float model, exported with the same exporter settings;
* ``deploy ifmr`` / ``deploy hfmg``: amct_opt's ``<prefix>_deploy_model.onnx`` of
  the all-INT8 model, its activations calibrated with IFMR (the config's
  default) or HFMG (``"activation_quant_params": {"act_algo": "hfmg"}``);
* ``quantize_static``: ``onnxruntime.quantization.quantize_static`` on the fp32
  model (QDQ, per-channel, MinMax, after ``quant_pre_process``) with the same
  calibration batches.

Latency is the median of ``--runs`` (>= 50) timed runs, at batch 1 and 32, with
``--threads`` intra-op threads (default 2) and every graph optimization on; the
models take turns in 5 blocks of runs, each after 10 warm-up runs, so
that the machine's load changes affect them alike.  Accuracy is the subject's
own metrics, computed through ORT.  Subjects: the examples' MobileNetV2 on MNIST
(top-1, log-likelihood, and fidelity to the float model) and MiniLM sentence
encoder (cosine to the fp32 torch embeddings), when ``examples/`` imports.

:func:`benchmark` takes (float model, quantized models, calibration batches,
evaluation), so any other model plugs in the same way.

Run: ``python benchmarks/bench_export.py [--subjects mobilenet_v2 minilm] [--runs 50]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
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
from amct_opt.calibration import calibrate_layers
from amct_opt.config import QuantConfig
from amct_opt.create_config import create_quant_config
from amct_opt.export import export_float_model, export_models
from amct_opt.export.ort_check import (
    INTEGER_OPS,
    VNNI_FLAGS,
    cpu_flags,
    median_latencies,
    op_counts,
    optimized_model,
    seven_bit_convolutions,
    u8s8_kernels_may_saturate,
)
from amct_opt.fusion import find_conv_bn_pairs, fold_conv_bn
from amct_opt.quant_model import QuantizedModel, build_quantized_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_export.md"
BATCH_SIZES = (1, 32)
logger = logging.getLogger("bench_export")
WARMUP = 10
ROUNDS = 5

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Evaluation:
    """Evaluation batches and the metrics of the outputs of all of them (concatenated).

    ``scores`` maps the outputs to ``{metric name: value}``; higher is better,
    except for the metrics in :data:`LOWER_IS_BETTER`.
    """

    batches: Sequence[Batch]
    scores: Callable[[np.ndarray], dict[str, float]]
    #: The metrics the accuracy target compares (default: all).
    judged: tuple[str, ...] | None = None
    classifier: bool = True


@dataclass(frozen=True)
class Row:
    """One model of one subject: how fast it runs, how accurate it is."""

    subject: str
    variant: str
    latency_ms: dict[int, float]
    metrics: dict[str, float]
    judged: tuple[str, ...]
    integer_ops: int


@dataclass(frozen=True)
class Agreement:
    """Deploy against fake-quant outputs: top-1 agreement and per-output cosine.

    ``run`` says how the deploy model ran: fused into ORT's integer kernels, or
    unfused (its Q/DQ arithmetic node by node: the model's own numbers).
    """

    subject: str
    run: str
    top1: float | None
    min_cosine: float
    mean_cosine: float


def _session(path: Path, threads: int, fused: bool = True) -> ort.InferenceSession:
    """A CPU session; ``fused=False`` runs the graph as written (no QDQ fusion into integer kernels)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
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


def median_latencies_ms(
    sessions: dict[str, ort.InferenceSession], inputs: Sequence[np.ndarray], runs: int
) -> dict[str, float]:
    """Median wall time per session of ``runs`` timed calls, in :data:`ROUNDS` blocks that take
    turns, each after :data:`WARMUP` untimed calls (see :func:`median_latencies`)."""
    medians = median_latencies(
        list(sessions.values()), [_feed(s, inputs) for s in sessions.values()], runs, WARMUP, ROUNDS
    )
    return {name: 1000 * median for name, median in zip(sessions, medians, strict=True)}


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """The calibration batches, as ORT's quantizer reads them."""

    def __init__(self, names: Sequence[str], batches: Sequence[Batch]) -> None:
        self._feeds = iter([{n: t.numpy() for n, t in zip(names, batch)} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def ort_quantize_static(
    fp32: Path, out: Path, names: Sequence[str], batches: Sequence[Batch], reduce_range: bool = False
) -> None:
    """ORT's own static QDQ quantization: per-channel, MinMax, default (int8) types.

    ``reduce_range`` is ORT's 7-bit weights, its advice for x86 CPUs without VNNI.
    """
    prepared = out.with_name(f"{out.stem}_prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        _Reader(names, batches),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        reduce_range=reduce_range,
    )


def library_qmodel(
    model: nn.Module, batches: Sequence[Batch], workdir: Path, weight_bits: int = 8, act_algo: str = "ifmr"
) -> QuantizedModel:
    """amct_opt's default quantization of ``model`` (its config, BN folding, calibration), all layers on.

    Convolutions get ``weight_bits``-bit weights; Linear layers keep 8 (see
    :func:`amct_opt.export.ort_check.saturation_safe_defination`).
    """
    config_path = workdir / f"config_{act_algo}.json"
    defination: dict[str, Any] = dict(seven_bit_convolutions(model) or {}) if weight_bits == 7 else {}
    if act_algo != "ifmr":
        defination["activation_quant_params"] = {"act_algo": act_algo}
    create_quant_config(
        str(config_path), model, batches[0], batch_num=len(batches), config_defination=defination or None
    )
    config = QuantConfig.load(config_path)
    folded = fold_conv_bn(model, find_conv_bn_pairs(model))
    calibration = calibrate_layers(folded, config, lambda m: [m(*batch) for batch in batches])
    with torch.no_grad():
        return build_quantized_model(folded, calibration.record, calibration.output_ranges).eval()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _outputs(session: ort.InferenceSession, batches: Sequence[Batch]) -> np.ndarray:
    return np.concatenate([session.run(None, _feed(session, [t.numpy() for t in b]))[0] for b in batches])


def agreement(subject: str, run: str, fake_quant: np.ndarray, deploy: np.ndarray, classifier: bool) -> Agreement:
    cosine = (
        (fake_quant * deploy).sum(1) / np.linalg.norm(fake_quant, axis=1) / np.linalg.norm(deploy, axis=1)
    )
    top1 = float((fake_quant.argmax(1) == deploy.argmax(1)).mean()) if classifier else None
    return Agreement(subject, run, top1, float(cosine.min()), float(cosine.mean()))


def benchmark(
    name: str,
    float_model: nn.Module,
    qmodels: dict[str, QuantizedModel],
    calibration: Sequence[Batch],
    evaluation: Evaluation,
    input_names: Sequence[str],
    output_names: Sequence[str],
    workdir: Path,
    runs: int = 50,
    threads: int = 2,
    reduce_range: bool = False,
) -> tuple[list[Row], list[Agreement]]:
    """fp32, deploy and quantize_static ONNX models of one subject: latency and metric of each.

    ``qmodels`` maps a label (the activation calibration) to a quantized model;
    each gives a ``deploy <label>`` variant.  Also compares each deploy model's
    outputs with its fake-quant model's, run both fused (ORT's integer kernels)
    and unfused (the model's arithmetic).
    """
    axes = {n: {0: "batch"} for n in (*input_names, *output_names)}
    fp32 = workdir / f"{name}_fp32.onnx"
    export_float_model(float_model, fp32, calibration[0], input_names, output_names, axes)
    exported = {
        f"deploy {label}": export_models(
            qmodel,
            workdir / f"{name}_{label}",
            calibration[0],
            input_names,
            output_names,
            axes,
            calibration=lambda m: [m(*batch) for batch in calibration],
        )
        for label, qmodel in qmodels.items()
    }
    static = workdir / f"{name}_quantize_static.onnx"
    ort_quantize_static(fp32, static, input_names, calibration, reduce_range)
    paths = {"fp32": fp32, **{v: e.deploy_path for v, e in exported.items()}, "quantize_static": static}
    sessions = {variant: _session(path, threads) for variant, path in paths.items()}
    latency = {
        size: median_latencies_ms(sessions, _resize(calibration[0], size), runs) for size in BATCH_SIZES
    }
    rows, outputs = [], {}
    for variant, session in sessions.items():
        outputs[variant] = _outputs(session, evaluation.batches)
        counts = op_counts(optimized_model(paths[variant], ort.GraphOptimizationLevel.ORT_ENABLE_ALL))
        integer_ops = sum(counts[op] for op in INTEGER_OPS)
        variant_latency = {size: latency[size][variant] for size in BATCH_SIZES}
        metrics = evaluation.scores(outputs[variant])
        judged = tuple(metrics) if evaluation.judged is None else evaluation.judged
        rows.append(Row(name, variant, variant_latency, metrics, judged, integer_ops))
        logger.info("%s %s: %s ms, %s", name, variant, variant_latency, rows[-1].metrics)
    agreements = []
    for variant, models in exported.items():
        fake_quant = _outputs(_session(models.fake_quant_path, threads), evaluation.batches)
        unfused = _outputs(_session(models.deploy_path, threads, fused=False), evaluation.batches)
        agreements += [
            agreement(name, f"{variant}, integer kernels", fake_quant, outputs[variant], evaluation.classifier),
            agreement(name, f"{variant}, unfused", fake_quant, unfused, evaluation.classifier),
        ]
    return rows, agreements


# -- the examples' subjects -------------------------------------------------------------------


def _import_examples() -> None:
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))


@dataclass(frozen=True)
class Settings:
    """How every subject is measured.

    ``weight_bits``: our convolutions' weights; 7 also sets quantize_static's
    reduce_range on subjects that have convolutions.  ``act_algos``: the
    activation calibrations to export a deploy model with, each a variant.
    """

    runs: int
    threads: int
    weight_bits: int
    act_algos: tuple[str, ...] = ("ifmr",)


def mobilenet_v2(workdir: Path, settings: Settings) -> tuple[list[Row], list[Agreement]]:
    """The examples' MobileNetV2 trained on MNIST digits, on the 1,000 test digits.

    Metrics: top-1 and the mean log-likelihood of the true class, and the
    fidelity to the float torch model: the mean KL divergence of its class
    distribution, and how often the top-1 class is the float model's.  The
    targets are judged on fidelity: a model that quantization makes right on a
    digit the float model gets wrong is not more accurate, only lucky.
    """
    _import_examples()
    from mnist_data import load_mnist
    from mobilenet_v2 import train_or_load

    data = load_mnist()
    model = train_or_load(ROOT / "examples" / ".cache", data).eval()
    batches = [(data.train_x[i : i + 64],) for i in range(0, 256, 64)]
    qmodels = {algo: library_qmodel(model, batches, workdir, settings.weight_bits, algo) for algo in settings.act_algos}
    labels = data.test_y.numpy()
    with torch.no_grad():
        reference = _log_softmax(model(data.test_x).numpy())

    def scores(logits: np.ndarray) -> dict[str, float]:
        log_p = _log_softmax(logits)
        return {
            "top-1": float((log_p.argmax(1) == labels).mean()),
            "log-likelihood": float(log_p[np.arange(len(labels)), labels].mean()),
            "KL to fp32": float((np.exp(reference) * (reference - log_p)).sum(1).mean()),
            "top-1 agreement with fp32": float((log_p.argmax(1) == reference.argmax(1)).mean()),
        }

    evaluation = Evaluation(
        [(data.test_x[i : i + 250],) for i in range(0, len(data.test_x), 250)],
        scores,
        judged=("KL to fp32", "top-1 agreement with fp32"),
    )
    return benchmark(
        "mobilenet_v2", model, qmodels, batches, evaluation, ["input"], ["logits"], workdir,
        settings.runs, settings.threads, settings.weight_bits == 7,  # a conv net: reduce_range applies
    )


def minilm(workdir: Path, settings: Settings) -> tuple[list[Row], list[Agreement]]:
    """The examples' MiniLM sentence encoder; metric: mean cosine to the fp32 torch embeddings."""
    _import_examples()
    from minilm_encoder import embed, load_minilm, load_sentences, tokenize

    model, tokenizer = load_minilm()
    calibration_sentences, evaluation_sentences = load_sentences()
    ids, mask = tokenize(tokenizer, calibration_sentences)
    batches = [(ids[i : i + 16], mask[i : i + 16]) for i in range(0, len(ids), 16)]
    eval_ids, eval_mask = tokenize(tokenizer, evaluation_sentences)
    reference = embed(model, eval_ids, eval_mask).numpy()
    qmodels = {algo: library_qmodel(model, batches, workdir, settings.weight_bits, algo) for algo in settings.act_algos}

    def mean_cosine(got: np.ndarray) -> dict[str, float]:
        cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        return {"mean cosine": float(cos.mean()), "min cosine": float(cos.min())}

    evaluation = Evaluation(
        [(eval_ids[i : i + 64], eval_mask[i : i + 64]) for i in range(0, len(eval_ids), 64)],
        mean_cosine,
        classifier=False,
    )
    return benchmark(
        "minilm",
        model,
        qmodels,
        batches,
        evaluation,
        ["input_ids", "attention_mask"],
        ["embedding"],
        workdir,
        settings.runs,
        settings.threads,
        False,  # no convolution: 8-bit weights on both sides
    )


SUBJECTS: dict[str, Callable[[Path, Settings], tuple[list[Row], list[Agreement]]]] = {
    "mobilenet_v2": mobilenet_v2,
    "minilm": minilm,
}


def cpu_description() -> str:
    """The CPU model and whether it has VNNI (without it ORT's u8s8 kernels may saturate)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    vnni = [f for f in VNNI_FLAGS if f in (cpu_flags() or [])]
    return f"{model}; " + (f"VNNI: {', '.join(vnni)}" if vnni else "no VNNI (AVX2 u8s8 kernels, which may saturate)")


# -- the table --------------------------------------------------------------------------------


def table(rows: Sequence[Row]) -> str:
    """Latency per batch size, speed-up over fp32, ratio to quantize_static, metrics, integer kernels."""
    head = ["model", "variant"] + [f"b{b} ms" for b in BATCH_SIZES]
    head += [
        f"fp32/this b{BATCH_SIZES[-1]}",
        f"this/quantize_static b{BATCH_SIZES[-1]}",
        "accuracy",
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
        cells += [", ".join(f"{name} {value:.4g}" for name, value in row.metrics.items()), str(row.integer_ops)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The export issue's targets: deploy >= 1.6x fp32 at batch 32 on the conv net, and on every subject
#: no slower than quantize_static (ratio <= 1.05) and at least as accurate on the judged metrics.
CONV_NET = "mobilenet_v2"
MIN_SPEEDUP = 1.6
MAX_STATIC_RATIO = 1.05
#: Metrics where lower is better.
LOWER_IS_BETTER = frozenset({"KL to fp32"})


def target_lines(rows: Sequence[Row]) -> list[str]:
    """One line per target and subject: what was measured, and whether the target holds."""
    by_key = {(r.subject, r.variant): r for r in rows}
    big = BATCH_SIZES[-1]
    lines = []
    for subject in sorted({r.subject for r in rows}):
        fp32, static = by_key[(subject, "fp32")], by_key[(subject, "quantize_static")]
        for deploy in (r for r in rows if r.subject == subject and r.variant.startswith("deploy")):
            label = f"{subject}: {deploy.variant}"
            if subject == CONV_NET:
                speedup = fp32.latency_ms[big] / deploy.latency_ms[big]
                lines.append(f"{label} {speedup:.2f}x faster than fp32 at batch {big} "
                             f"(target >= {MIN_SPEEDUP}x): {'met' if speedup >= MIN_SPEEDUP else 'NOT met'}")
            ratio = deploy.latency_ms[big] / static.latency_ms[big]
            lines.append(f"{label}/quantize_static latency {ratio:.2f} at batch {big} "
                         f"(target <= {MAX_STATIC_RATIO}): {'met' if ratio <= MAX_STATIC_RATIO else 'NOT met'}")
            for name in deploy.judged:
                ours, theirs = deploy.metrics[name], static.metrics[name]
                good = ours <= theirs if name in LOWER_IS_BETTER else ours >= theirs
                lines.append(f"{label} {name} {ours:.4g} vs quantize_static {theirs:.4g} "
                             f"(target: at least as good): {'met' if good else 'NOT met'}")
    return lines


def agreement_table(agreements: Sequence[Agreement]) -> str:
    lines = [
        "| model | deploy run | deploy vs fake-quant top-1 | min cosine | mean cosine |",
        "|---|---|---|---|---|",
    ]
    for a in agreements:
        top1 = "-" if a.top1 is None else f"{a.top1:.4f}"
        lines.append(f"| {a.subject} | {a.run} | {top1} | {a.min_cosine:.5f} | {a.mean_cosine:.5f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", nargs="+", choices=sorted(SUBJECTS), default=sorted(SUBJECTS))
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement (>= 50)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument(
        "--weight-bits", choices=["auto", "7", "8"], default="auto",
        help="our convolutions' weight num_bits (7 also gives quantize_static reduce_range on the conv net); "
        "auto: 7 where ORT's u8s8 kernels may saturate (x86 without VNNI), else 8",
    )
    parser.add_argument(
        "--act-algos", nargs="+", choices=["ifmr", "hfmg"], default=["ifmr", "hfmg"],
        help="activation calibrations to export a deploy model with (default: both; ifmr is the config default)",
    )
    parser.add_argument("--write-results", action="store_true", help=f"also write the tables to {RESULTS}")
    args: Any = parser.parse_args(argv)
    if args.runs < 50:
        parser.error("--runs must be at least 50")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bits = (7 if u8s8_kernels_may_saturate() else 8) if args.weight_bits == "auto" else int(args.weight_bits)
    settings = Settings(args.runs, args.threads, bits, tuple(args.act_algos))
    rows: list[Row] = []
    agreements: list[Agreement] = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for subject in args.subjects:
            workdir = Path(tmp) / subject
            workdir.mkdir()
            subject_rows, subject_agreements = SUBJECTS[subject](workdir, settings)
            rows += subject_rows
            agreements += subject_agreements
    command = " ".join(["python benchmarks/bench_export.py", *(sys.argv[1:] if argv is None else argv)])
    text = (
        f"ORT {ort.__version__}, {args.threads} intra-op threads, median of {args.runs} runs in "
        f"{ROUNDS} blocks that take turns, each after {WARMUP} warm-up runs.\nCPU: {cpu_description()}\n"
        f"Convolution weights: {bits}-bit (ours; Linear layers 8-bit), quantize_static reduce_range={bits == 7} "
        f"on the conv net.\nCommand: `{command}`\n\n"
        + table(rows)
        + "\n\n"
        + agreement_table(agreements)
        + "\n\nTargets:\n\n"
        + "\n".join(f"- {line}" for line in target_lines(rows))
        + "\n"
    )
    print(text)
    if args.write_results:
        atomic_write_text(RESULTS, text)


if __name__ == "__main__":
    main()
