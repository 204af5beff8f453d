"""Fixtures of the export tests: each hand-written case is quantized and exported once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from export_cases import CASES, Exported
from export_helpers import quantize

from amct_opt.export import export_models


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    """``exported(name)``: the case quantized (records from real min/max) and exported, cached."""
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            case = CASES[name]
            torch.manual_seed(0)
            model = case.make().eval()
            calibration, test = torch.randn(16, *case.shape), torch.randn(32, *case.shape)
            qmodel = quantize(
                model, (calibration,), case.float_layers, case.per_channel_linear, case.symmetric
            )
            paths = export_models(
                qmodel,
                tmp_path_factory.mktemp(name) / name,
                (calibration[:2],),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                calibration=lambda m, c=calibration: m(c),
            )
            cache[name] = Exported(qmodel, calibration, test, paths, case)
        return cache[name]

    return get
