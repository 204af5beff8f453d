"""The ``amct-opt`` console command: inspect, report and export search studies.

Commands::

    amct-opt studies STORAGE
    amct-opt dashboard STORAGE [--port 8080] [--host localhost]
    amct-opt report STORAGE --study NAME --out DIR
    amct-opt export STORAGE --study NAME --trial N --model-factory module:callable \\
        --input-shape 1,3,224,224 --config tmp/config.json --save-dir results/model
    amct-opt worker JOB --storage URL --study NAME [--n-trials N] [--processes K]

``STORAGE`` is a SQLAlchemy URL (``sqlite:///results/amct_opt.db``,
``postgresql://user:password@host/db``) or the path of a SQLite file.
Printed URLs never show a password.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import AmctError, InputError
from .storage import describe_storage, mask_secrets, open_storage
from .worker import configure_worker_parser

__all__ = ["main"]


def _storage_url(text: str) -> str:
    """A SQLAlchemy URL; an existing file path becomes a ``sqlite:///`` URL."""
    if "://" not in text:
        path = Path(text)
        if not path.is_file():
            raise InputError(f"STORAGE: {text!r} is neither a SQLAlchemy URL nor an existing SQLite file")
        return f"sqlite:///{path.resolve().as_posix()}"
    return text


def _studies(args: argparse.Namespace) -> int:
    import optuna

    from .report import read_trials

    url = _storage_url(args.storage)
    storage = open_storage(url)
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    print(f"studies in {describe_storage(url)}:")
    if not summaries:
        print("  (none)")
        return 0
    print(f"  {'study':<32} {'trials':>6} {'evaluated':>9} {'feasible':>8}  best feasible share")
    for summary in sorted(summaries, key=lambda s: s.study_name):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        rows = read_trials(study)
        feasible = [r for r in rows if r.ok]
        best = f"{100 * max(r.share for r in feasible):.1f}%" if feasible else "-"
        print(f"  {summary.study_name:<32} {summary.n_trials:>6} {len(rows):>9} {len(feasible):>8}  {best}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise InputError(
            "dashboard: optuna-dashboard is not installed; install the extra: pip install 'amct_opt[dashboard]'"
        ) from None
    url = _storage_url(args.storage)
    storage = open_storage(url)
    print(f"optuna-dashboard for {describe_storage(url)} on http://{args.host}:{args.port}/ (Ctrl+C stops it)",
          flush=True)
    try:
        run_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .trial_export import load_study

    study = load_study(_storage_url(args.storage), args.study)
    for path in write_report(study, args.out):
        print(path)
    return 0


def _load_factory(spec: str) -> Any:
    """The nn.Module returned by ``module:callable`` (the current folder is importable)."""
    from torch import nn

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"--model-factory: expected 'module:callable', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"--model-factory: cannot load {spec!r}: {exc}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"--model-factory: {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _inputs(args: argparse.Namespace) -> tuple[Any, ...]:
    import torch

    if args.input_data:
        data = torch.load(args.input_data, map_location="cpu", weights_only=True)
        return tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not args.input_shape:
        raise InputError("export: give --input-shape (random inputs) or --input-data (a saved tensor)")
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for text in args.input_shape:
        try:
            shape = [int(v) for v in text.split(",")]
        except ValueError:
            raise InputError(f"--input-shape: expected comma-separated ints like 1,3,224,224, got {text!r}") from None
        tensors.append(torch.randn(*shape, generator=generator))
    return tuple(tensors)


def _export(args: argparse.Namespace) -> int:
    from .trial_export import export_trial

    model = _load_factory(args.model_factory)
    result = export_trial(
        model, args.study, _storage_url(args.storage), args.trial, args.save_dir, _inputs(args), args.config,
    )
    floats = [name for name, on in result.plan.items() if not on]
    print(f"trial {result.trial_number}: {sum(result.plan.values())}/{len(result.plan)} layers INT8, "
          f"kept float: {', '.join(floats) or '(none)'}")
    for path in (result.deploy_model, result.fake_quant_model, result.final_config):
        print(path)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amct-opt", description="Inspect, report and export amct_opt search studies.")
    commands = parser.add_subparsers(dest="command", required=True)
    storage_help = "SQLAlchemy URL or SQLite file of the study storage"

    studies = commands.add_parser("studies", help="list the studies and their best feasible share")
    studies.add_argument("storage", metavar="STORAGE", help=storage_help)
    studies.set_defaults(run=_studies)

    dashboard = commands.add_parser("dashboard", help="start optuna-dashboard on the storage")
    dashboard.add_argument("storage", metavar="STORAGE", help=storage_help)
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.add_argument("--host", default="localhost")
    dashboard.set_defaults(run=_dashboard)

    report = commands.add_parser("report", help="write PNG (and HTML with plotly) plots of a study")
    report.add_argument("storage", metavar="STORAGE", help=storage_help)
    report.add_argument("--study", required=True, help="study name")
    report.add_argument("--out", required=True, help="output folder")
    report.set_defaults(run=_report)

    export = commands.add_parser("export", help="export a stored trial as deploy / fake-quant ONNX + config")
    export.add_argument("storage", metavar="STORAGE", help=storage_help)
    export.add_argument("--study", required=True, help="study name")
    export.add_argument("--trial", required=True, type=int, help="trial number (a COMPLETE trial)")
    export.add_argument("--model-factory", required=True, help="module:callable returning the float nn.Module")
    export.add_argument("--input-shape", action="append", help="shape of a random input, e.g. 1,3,224,224 "
                        "(repeat for several inputs)")
    export.add_argument("--input-data", help="a tensor (or tuple) saved with torch.save, instead of --input-shape")
    export.add_argument("--config", required=True, help="the quant config file the search ran with")
    export.add_argument("--save-dir", required=True, help="folder plus file-name prefix, e.g. results/model")
    export.set_defaults(run=_export)

    worker = commands.add_parser("worker", help="run workers of a distributed search on one shared study")
    configure_worker_parser(worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; errors print one line (passwords masked) and exit with status 2."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="amct-opt: %(message)s")
    try:
        return int(args.run(args))
    except AmctError as exc:
        print(f"amct-opt {args.command}: error: {mask_secrets(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
