"""Plots of a search study, written without a browser (``amct-opt report``).

PNG files (matplotlib, Agg canvas, written atomically):

* ``history.png``: the quantized share of each feasible trial and the best so far;
* ``pareto_front.png``: loss against quantized share, feasible and infeasible
  trials coloured, the feasible Pareto front highlighted;
* ``param_importance.png``: how much each layer's decision drives the loss
  (fANOVA, or a simple loss-gap measure when it cannot run);
* ``layers_kept_float.png``: how often each layer was kept float in feasible
  trials, most sensitive layer first (study attribute ``ranking``).

With plotly installed, Optuna's interactive versions are written as HTML too.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._io import atomic_write_bytes, atomic_write_text
from .errors import InputError
from .trials import INT8

__all__ = ["TrialRow", "float_frequency", "layer_importance", "pareto_front", "read_trials", "write_report"]

logger = logging.getLogger("amct_opt")


@dataclass(frozen=True)
class TrialRow:
    """One evaluated trial as the report sees it."""

    number: int
    plan: dict[str, bool]
    ok: bool
    loss: float
    share: float


def _share(trial: FrozenTrial) -> float:
    """The searched objective's share (the last objective value), else the MAC share."""
    if trial.values:
        return float(trial.values[-1])
    return float(trial.user_attrs.get("quant_share_macs", 0.0))


def read_trials(study: optuna.Study) -> list[TrialRow]:
    """Completed, really evaluated trials of the study's current model and config, oldest first.

    Copies of an earlier identical trial are left out, and so are trials made
    for an earlier model or config of the study (another ``fingerprint``).
    """
    current = study.user_attrs.get("fingerprint")
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if "metric" not in attrs or "cached_from" in attrs:
            continue
        if current is not None and attrs.get("fingerprint", current) != current:
            continue
        plan = {name: value == INT8 for name, value in trial.params.items()}
        rows.append(TrialRow(trial.number, plan, bool(attrs.get("ok")), float(attrs["loss"]), _share(trial)))
    return rows


def pareto_front(rows: list[TrialRow]) -> list[TrialRow]:
    """Feasible trials that no feasible trial beats on both lower loss and larger share; by share."""
    feasible = [r for r in rows if r.ok]
    front = [
        r for r in feasible
        if not any(
            o.loss <= r.loss and o.share >= r.share and (o.loss < r.loss or o.share > r.share) for o in feasible
        )
    ]
    return sorted(front, key=lambda r: (r.share, r.number))


def float_frequency(rows: list[TrialRow], layers: list[str]) -> dict[str, float]:
    """Per layer, the fraction of feasible trials that keep it float."""
    feasible = [r for r in rows if r.ok]
    if not feasible:
        return dict.fromkeys(layers, 0.0)
    return {name: sum(not r.plan.get(name, True) for r in feasible) / len(feasible) for name in layers}


def layer_importance(study: optuna.Study, rows: list[TrialRow]) -> tuple[dict[str, float], str]:
    """Each layer's importance for the loss, and the method's name.

    Optuna's fANOVA evaluator (it needs scikit-learn) runs on the evaluated
    trials; when it cannot (too few or too uniform trials, no scikit-learn) the
    fallback is, per layer, the normalised gap between the mean loss with it
    quantized and with it float.
    """
    numbers = {r.number for r in rows}
    trials = [t for t in study.get_trials(deepcopy=False) if t.number in numbers]
    if len(trials) >= 2:
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            scratch = optuna.create_study()
        finally:
            optuna.logging.set_verbosity(verbosity)
        scratch.add_trials(
            [
                optuna.trial.create_trial(
                    params=t.params, distributions=t.distributions, value=float(t.user_attrs["loss"])
                )
                for t in trials
            ]
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = optuna.importance.get_param_importances(
                    scratch, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
                )
            if scores and all(math.isfinite(v) for v in scores.values()):
                return dict(scores), "fANOVA importance of each decision for the loss"
        except Exception as exc:  # noqa: BLE001 - any evaluator failure falls back
            logger.info("parameter importance fell back to loss gaps: %s", exc)
    layers = sorted({name for r in rows for name in r.plan})
    gaps = {}
    for name in layers:
        on = [r.loss for r in rows if r.plan.get(name)]
        off = [r.loss for r in rows if not r.plan.get(name, True)]
        gaps[name] = abs(sum(on) / len(on) - sum(off) / len(off)) if on and off else 0.0
    total = sum(gaps.values()) or 1.0
    ordered = sorted(gaps, key=lambda n: -gaps[n])
    return {name: gaps[name] / total for name in ordered}, "mean loss gap, quantized vs float (fallback)"


# -- figures ---------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 4.5) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(
            "report: matplotlib is not installed; install the extra: pip install 'amct_opt[report]'"
        ) from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # long layer names stay inside
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _history(rows: list[TrialRow], title: str) -> Any:
    fig = _figure()
    ax = fig.subplots()
    feasible = [r for r in rows if r.ok]
    failed = [r for r in rows if not r.ok]
    ax.scatter([r.number for r in failed], [100 * r.share for r in failed], marker="x", color="0.65",
               label="misses the target")
    ax.scatter([r.number for r in feasible], [100 * r.share for r in feasible], color="tab:green",
               label="feasible")
    best, xs, ys = None, [], []
    for r in rows:
        if r.ok and (best is None or r.share > best):
            best = r.share
        if best is not None:
            xs.append(r.number)
            ys.append(100 * best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:blue", label="best feasible so far")
    ax.set(xlabel="trial", ylabel="quantized share (%)", title=title)
    ax.legend(loc="lower right")
    return fig


def _pareto(rows: list[TrialRow], title: str) -> Any:
    fig = _figure()
    ax = fig.subplots()
    for ok, colour, label in ((False, "tab:red", "misses the target"), (True, "tab:green", "feasible")):
        chosen = [r for r in rows if r.ok is ok]
        ax.scatter([100 * r.share for r in chosen], [r.loss for r in chosen], color=colour, alpha=0.6, label=label)
    front = pareto_front(rows)
    if front:
        ax.step([100 * r.share for r in front], [r.loss for r in front], where="post", color="black",
                linewidth=1.2)
        ax.scatter([100 * r.share for r in front], [r.loss for r in front], facecolors="none",
                   edgecolors="black", s=90, linewidths=1.5, label="Pareto front (feasible)")
    ax.set(xlabel="quantized share (%)", ylabel="loss (metric_eval)", title=title)
    ax.legend(loc="upper left")
    return fig


def _bars(labels: list[str], values: list[float], colours: list[str], xlabel: str, title: str) -> Any:
    fig = _figure(7.0, max(2.5, 0.32 * len(labels) + 1.2))
    ax = fig.subplots()
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    return fig


def _html(study: optuna.Study, out: Path, share: Callable[[FrozenTrial], float]) -> list[Path]:
    """Optuna's interactive plotly figures, when plotly is installed."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        logger.info("plotly is not installed: HTML plots skipped")
        return []
    from optuna import visualization as vis

    figures = {
        "history.html": lambda: vis.plot_optimization_history(study, target=share, target_name="quantized share"),
        "param_importance.html": lambda: vis.plot_param_importances(
            study, target=lambda t: float(t.user_attrs.get("loss", 0.0)), target_name="loss"
        ),
    }
    if len(study.directions) == 2:
        figures["pareto_front.html"] = lambda: vis.plot_pareto_front(study, target_names=["loss", "quantized share"])
    written = []
    for name, make in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                atomic_write_text(out / name, make().to_html(include_plotlyjs="cdn"))
            written.append(out / name)
        except Exception as exc:  # noqa: BLE001 - a plot Optuna cannot draw is skipped, not fatal
            logger.warning("%s skipped: %s", name, exc)
    return written


def write_report(study: optuna.Study, out_dir: str | Path) -> list[Path]:
    """Write the report's PNG files (and HTML with plotly) to ``out_dir``; returns their paths."""
    rows = read_trials(study)
    if not rows:
        raise InputError(f"study: {study.study_name!r} has no evaluated trial to report on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = study.study_name
    written = [
        _save_png(_history(rows, f"{name}: quantized share of feasible trials"), out / "history.png"),
        _save_png(_pareto(rows, f"{name}: loss vs quantized share"), out / "pareto_front.png"),
    ]
    importance, method = layer_importance(study, rows)
    top = list(importance)[:30]
    written.append(_save_png(
        _bars(top, [importance[n] for n in top], ["tab:purple"] * len(top), method, f"{name}: parameter importance"),
        out / "param_importance.png",
    ))
    ranking = study.user_attrs.get("ranking")
    layers = study.user_attrs.get("layers") or sorted({n for r in rows for n in r.plan})
    if isinstance(ranking, dict) and set(ranking) >= set(layers):
        layers = sorted(layers, key=lambda n: (ranking[n], n))
        labels = [f"{n} ({ranking[n]:.4f})" for n in layers]
    else:
        labels = list(layers)
    frequency = float_frequency(rows, layers)
    best = max((r for r in rows if r.ok), key=lambda r: (r.share, -r.loss), default=None)
    colours = ["tab:orange" if best is not None and not best.plan.get(n, True) else "tab:gray" for n in layers]
    written.append(_save_png(
        _bars(labels, [100 * frequency[n] for n in layers], colours,
              "% of feasible trials keeping the layer float (orange: float in the best trial)",
              f"{name}: layers kept float, most sensitive first"),
        out / "layers_kept_float.png",
    ))
    written += _html(study, out, _share)
    return written
