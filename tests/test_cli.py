"""The amct-opt console command on the shared SmallNet study: studies, report, export, dashboard."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
from conftest import Trained
from search_run import SearchedRun, searched_run

from amct_opt.cli import main
from amct_opt.trials import INT8

TESTS = Path(__file__).resolve().parent


@pytest.fixture()
def run(tmp_path_factory: pytest.TempPathFactory, trained: Trained) -> SearchedRun:
    return searched_run(tmp_path_factory, trained)


def final_number(run: SearchedRun) -> int:
    study = optuna.load_study(study_name=run.study_name, storage=run.storage)
    return next(
        t.number for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if "cached_from" not in t.user_attrs and {n: v == INT8 for n, v in t.params.items()} == run.result.final_plan
    )


def write_factory(run: SearchedRun, folder: Path) -> None:
    """``factory:make`` in ``folder``: the shared run's SmallNet, rebuilt from saved weights."""
    torch.save(run.model.state_dict(), folder / "weights.pt")
    (folder / "factory.py").write_text(
        "import sys\nimport torch\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from conftest import SmallNet\n\n"
        "def make():\n"
        "    model = SmallNet()\n"
        f"    model.load_state_dict(torch.load({str(folder / 'weights.pt')!r}, weights_only=True))\n"
        "    return model.eval()\n"
    )


def test_studies_lists_the_best_feasible_share(run: SearchedRun, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["studies", run.storage]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("small"))
    assert f"{100 * run.result.quantized_share:.1f}%" in line


def test_studies_accepts_a_sqlite_file_path(run: SearchedRun, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["studies", str(run.folder / "amct_opt.db")]) == 0
    assert "small" in capsys.readouterr().out


def test_report_writes_the_pngs(run: SearchedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", run.storage, "--study", "small", "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("history.png", "pareto_front.png", "param_importance.png", "layers_kept_float.png"):
        path = tmp_path / "plots" / name
        assert str(path) in printed
        assert path.read_bytes().startswith(b"\x89PNG")


def test_export_with_the_runs_input_reproduces_its_deploy_model(
    run: SearchedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_factory(run, tmp_path)
    torch.save(run.input_data, tmp_path / "input.pt")
    monkeypatch.chdir(tmp_path)
    code = main([
        "export", run.storage, "--study", "small", "--trial", str(final_number(run)),
        "--model-factory", "factory:make", "--input-data", "input.pt",
        "--config", str(run.config_file), "--save-dir", str(tmp_path / "out" / "small"),
    ])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "small_deploy_model.onnx").read_bytes() == Path(
        run.result.paths["deploy_model"]).read_bytes()
    config = json.loads((tmp_path / "out" / "accuracy_based_auto_calibration_final_config.json").read_text())
    assert {n: config[n]["quant_enable"] for n in run.result.final_plan} == run.result.final_plan


def test_export_with_a_random_input_shape(run: SearchedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_factory(run, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([
        "export", str(run.folder / "amct_opt.db"), "--study", "small", "--trial", str(final_number(run)),
        "--model-factory", "factory:make", "--input-shape", "2,1,28,28",
        "--config", str(run.config_file), "--save-dir", "out/small",
    ]) == 0
    assert (tmp_path / "out" / "small_fake_quant_model.onnx").is_file()


def test_export_refuses_a_missing_trial(run: SearchedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    write_factory(run, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([
        "export", run.storage, "--study", "small", "--trial", "999", "--model-factory", "factory:make",
        "--input-shape", "1,1,28,28", "--config", str(run.config_file), "--save-dir", "out/small",
    ]) == 2
    assert "trial_number: study 'small' has no trial 999" in capsys.readouterr().err


def test_bad_model_factory_is_one_clear_line(run: SearchedRun, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", run.storage, "--study", "small", "--trial", "0", "--model-factory", "no_such_module:f",
                 "--input-shape", "1,1,28,28", "--config", str(run.config_file), "--save-dir", "x/y"]) == 2
    assert "--model-factory: cannot load 'no_such_module:f'" in capsys.readouterr().err


def test_passwords_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["studies", "postgresql+psycopg://amct:s3cr3t-pw@127.0.0.1:9/db"]) == 2
    err = capsys.readouterr().err
    assert "s3cr3t-pw" not in err and "***" in err


def test_dashboard_without_the_extra_says_how_to_install(
    run: SearchedRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # as if the package were not installed
    assert main(["dashboard", run.storage]) == 2
    assert "pip install 'amct_opt[dashboard]'" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_dashboard_serves_the_study(run: SearchedRun) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "amct_opt.cli", "dashboard", run.storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        body, deadline = "", time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    body = response.read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert '"small"' in body
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert f"on http://127.0.0.1:{port}/" in output
