"""amct_opt.report: the study's plots as PNG files, and the numbers behind them."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import Trained
from optuna.distributions import CategoricalDistribution
from search_run import SearchedRun, searched_run

from amct_opt.errors import InputError
from amct_opt.report import (
    TrialRow,
    float_frequency,
    layer_importance,
    pareto_front,
    read_trials,
    write_report,
)
from amct_opt.trials import CHOICES, FLOAT, INT8

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNGS = ["history.png", "pareto_front.png", "param_importance.png", "layers_kept_float.png"]


def row(number: int, ok: bool, loss: float, share: float, floats: tuple[str, ...] = ()) -> TrialRow:
    return TrialRow(number, {name: name not in floats for name in ("a", "b", "c")}, ok, loss, share)


def hand_made_study(losses: list[tuple[dict[str, str], float, bool]]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize"])
    distributions = {name: CategoricalDistribution(CHOICES) for name in ("a", "b", "c")}
    for params, loss, ok in losses:
        share = sum(v == INT8 for v in params.values()) / 3
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, value=share,
            user_attrs={"metric": 1 - loss, "loss": loss, "ok": ok},
        ))
    return study


def test_pareto_front_keeps_only_undominated_feasible_rows() -> None:
    rows = [row(0, False, 9.0, 1.0), row(1, True, 1.0, 0.5, ("a",)), row(2, True, 2.0, 0.4, ("a", "b")),
            row(3, True, 3.0, 0.8, ("c",)), row(4, True, 0.0, 0.0, ("a", "b", "c"))]
    assert [r.number for r in pareto_front(rows)] == [4, 1, 3]


def test_float_frequency_counts_feasible_trials_only() -> None:
    rows = [row(0, True, 0.1, 0.6, ("a",)), row(1, True, 0.1, 0.6, ("a", "b")), row(2, False, 5.0, 1.0, ("c",))]
    assert float_frequency(rows, ["a", "b", "c"]) == {"a": 1.0, "b": 0.5, "c": 0.0}


def test_importance_falls_back_on_a_single_trial() -> None:
    study = hand_made_study([({"a": INT8, "b": INT8, "c": FLOAT}, 2.0, False)])
    scores, method = layer_importance(study, read_trials(study))
    assert "fallback" in method and set(scores) == {"a", "b", "c"}


def test_importance_fallback_ranks_by_loss_gap() -> None:
    rows = [row(0, False, 2.0, 1.0), row(1, True, 0.5, 0.6, ("a",)), row(2, True, 1.9, 0.6, ("b",))]
    scores, method = layer_importance(optuna.create_study(), rows)  # no trial in it: Optuna cannot rank
    assert "fallback" in method
    assert list(scores) == ["a", "b", "c"] and scores["a"] > scores["b"] > 0


def test_importance_uses_optuna_with_enough_trials() -> None:
    grid = [{"a": a, "b": b, "c": c} for a in CHOICES for b in CHOICES for c in CHOICES]
    study = hand_made_study([(p, 3.0 * (p["a"] == INT8) + 0.1 * (p["c"] == INT8), p["a"] == FLOAT) for p in grid * 2])
    scores, method = layer_importance(study, read_trials(study))
    assert "fallback" not in method
    assert max(scores, key=scores.get) == "a"


def test_trials_of_an_earlier_model_are_left_out() -> None:
    study = optuna.create_study(directions=["maximize"])
    distributions = {name: CategoricalDistribution(CHOICES) for name in ("a", "b", "c")}
    for made_for in ("old", "new", None):
        attrs = {"metric": 1.0, "loss": 0.0, "ok": True} | ({} if made_for is None else {"fingerprint": made_for})
        study.add_trial(optuna.trial.create_trial(
            params=dict.fromkeys(("a", "b", "c"), INT8), distributions=distributions, value=1.0, user_attrs=attrs,
        ))
    assert [r.number for r in read_trials(study)] == [0, 1, 2]  # no current fingerprint: all of them
    study.set_user_attr("fingerprint", "new")
    assert [r.number for r in read_trials(study)] == [1, 2]


def test_write_report_refuses_an_empty_study(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no evaluated trial"):
        write_report(optuna.create_study(study_name="empty"), tmp_path)


def test_write_report_writes_every_png(tmp_path_factory: pytest.TempPathFactory, trained: Trained,
                                       tmp_path: Path) -> None:
    run: SearchedRun = searched_run(tmp_path_factory, trained)
    study = optuna.load_study(study_name=run.study_name, storage=run.storage)
    written = write_report(study, tmp_path / "report")
    for name in PNGS:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    try:
        import plotly  # noqa: F401
    except ImportError:
        assert sorted(p.name for p in written) == sorted(PNGS)
    else:
        assert (tmp_path / "report" / "history.html").is_file()
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]  # no temp files left
