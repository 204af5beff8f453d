"""check_dynamic_axes: both torch dict forms accepted, anything else rejected before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_helpers import Mlp, quantize

from amct_opt.errors import InputError
from amct_opt.export import check_dynamic_axes, export_deploy_model, export_fake_quant_model, export_models

NAMES = (["input"], ["logits"])


@pytest.mark.parametrize(
    "axes",
    [
        None,
        {"input": {0: "batch"}},
        {"input": [0], "logits": [0]},
        {"input": {0: "batch", 1: "features"}, "logits": {0: "batch"}},
        {},
    ],
)
def test_accepts_both_torch_forms(axes: dict | None) -> None:
    check_dynamic_axes(axes, *NAMES)


@pytest.mark.parametrize(
    ("axes", "names", "message"),
    [
        ({"image": {0: "batch"}}, NAMES, "image"),
        ({"input": [0]}, (None, None), "input"),
        ([("input", [0])], NAMES, "dict"),
        ({"input": {-1: "batch"}}, NAMES, "axis"),
        ({"input": {"0": "batch"}}, NAMES, "axis"),
        ({"input": {0: ""}}, NAMES, "axis"),
        ({"input": [0, 0]}, NAMES, "distinct"),
        ({"input": [True]}, NAMES, "distinct"),
        ({"input": "0"}, NAMES, "list of axes"),
        ({"input": 0}, NAMES, "list of axes"),
    ],
)
def test_rejects_malformed_or_unknown(axes: object, names: tuple, message: str) -> None:
    with pytest.raises(InputError, match="dynamic_axes") as info:
        check_dynamic_axes(axes, *names)  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("names", "arg"), [(("input", None), "input_names"), ((["a"], ["a", "a"]), "output_names")]
)
def test_rejects_bad_names(names: tuple, arg: str) -> None:
    with pytest.raises(InputError, match=arg):
        check_dynamic_axes(None, *names)


@pytest.mark.parametrize("export", [export_fake_quant_model, export_deploy_model, export_models])
def test_exports_check_before_any_work(export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 20)
    qmodel = quantize(Mlp(), (x,))

    def no_work(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("traced before the arguments were checked")

    monkeypatch.setattr("amct_opt.export._api.observe_output_ranges", no_work)
    monkeypatch.setattr("amct_opt.export._api.trace_to_onnx", no_work)
    with pytest.raises(InputError, match="dynamic_axes"):
        export(qmodel, tmp_path / "m", (x,), ["input"], ["logits"], {"inputs": [0]})
    with pytest.raises(InputError, match="qmodel"):
        export(Mlp(), tmp_path / "m", (x,))
    with pytest.raises(InputError, match="input_data"):
        export(qmodel, tmp_path / "m", "not a tuple")
    assert not list(tmp_path.iterdir())
