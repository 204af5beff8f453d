"""Which CPUs get 7-bit convolution weights: x86 without VNNI, where ORT's u8s8 kernels may saturate."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from export_helpers import ConvStack, Mlp, session

import amct_opt as amct
from amct_opt.export import export_float_model
from amct_opt.export.ort_check import median_latencies, saturation_safe_defination, u8s8_kernels_may_saturate

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
VNNI = "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni\n"


@pytest.fixture
def x86(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")


@pytest.mark.parametrize(("cpuinfo", "saturates"), [(AVX2, True), (VNNI, False), (None, False)])
def test_only_x86_without_vnni_may_saturate(x86: None, tmp_path: Path, cpuinfo: str | None, saturates: bool) -> None:
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert u8s8_kernels_may_saturate(path) is saturates


def test_arm_never_saturates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    (tmp_path / "cpuinfo").write_text(AVX2)
    assert not u8s8_kernels_may_saturate(tmp_path / "cpuinfo")


def test_the_defination_gives_convolutions_seven_bit_weights_and_linear_eight(x86: None, tmp_path: Path) -> None:
    (tmp_path / "avx2").write_text(AVX2)
    (tmp_path / "vnni").write_text(VNNI)
    model = ConvStack()
    assert saturation_safe_defination(model, tmp_path / "vnni") is None
    defination = saturation_safe_defination(model, tmp_path / "avx2")
    assert defination is not None
    config = amct.create_quant_config(
        str(tmp_path / "q.json"), model, torch.zeros(1, 3, 16, 16), config_defination=defination
    )
    bits = {name: layer.weight.num_bits for name, layer in config.layers.items()}
    assert bits == {"features.0.0": 7, "features.1.0": 7, "features.2.0": 7, "features.3.0": 7, "classifier": 8}


class _Logged:
    """A real ORT session that logs which session each call went to."""

    def __init__(self, inner: object, name: str, log: list[str]) -> None:
        self.inner, self.name, self.log = inner, name, log

    def run(self, *args: object) -> object:
        self.log.append(self.name)
        return self.inner.run(*args)  # type: ignore[attr-defined]


def test_median_latencies_time_each_session_in_blocks_that_take_turns(tmp_path: Path) -> None:
    x = torch.randn(4, 20)
    export_float_model(Mlp().eval(), tmp_path / "m.onnx", (x,), ["input"], ["logits"])
    log: list[str] = []
    sessions = [_Logged(session(tmp_path / "m.onnx"), name, log) for name in "ab"]
    medians = median_latencies(sessions, [{"input": x.numpy()}] * 2, runs=10, warmup=2, rounds=5)  # type: ignore[arg-type]
    assert len(medians) == 2 and all(m > 0 for m in medians)
    # 5 rounds of (2 warm-up + 2 timed) calls per session, a session's calls together in each round.
    assert log == (["a"] * 4 + ["b"] * 4) * 5
