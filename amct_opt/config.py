"""The quant config: typed dataclasses, JSON round trip and validation.

File form (the reference's)::

    {
      "version": 1, "batch_num": 2, "activation_offset": true,
      "do_fusion": true, "skip_fusion_layers": [],
      "features.0.0": {
        "quant_enable": true,
        "activation_quant_params": {"num_bits": 8, "act_algo": "ifmr",
            "max_percentile": 0.999999, "min_percentile": 0.999999,
            "search_range": [0.7, 1.3], "search_step": 0.01, "asymmetric": true},
        "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": true}
      }
    }

HFMG activations use ``{"num_bits": 8, "act_algo": "hfmg", "num_of_bins": 4096, "asymmetric": true}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ActivationQuantParams",
    "WeightQuantParams",
    "LayerQuantConfig",
    "QuantConfig",
]


@dataclass(frozen=True)
class ActivationQuantParams:
    """How one layer's input activation is calibrated (IFMR or HFMG)."""

    act_algo: str = "ifmr"  # "ifmr" | "hfmg"
    num_bits: int = 8
    asymmetric: bool = True
    # IFMR only
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = 0.01
    # HFMG only
    num_of_bins: int = 4096


@dataclass(frozen=True)
class WeightQuantParams:
    """How one layer's weight is quantized (ARQ, symmetric int8)."""

    num_bits: int = 8
    wts_algo: str = "arq_quantize"
    channel_wise: bool = True


@dataclass(frozen=True)
class LayerQuantConfig:
    quant_enable: bool = True
    activation: ActivationQuantParams = field(default_factory=ActivationQuantParams)
    weight: WeightQuantParams = field(default_factory=WeightQuantParams)


@dataclass(frozen=True)
class QuantConfig:
    """A whole quant config; ``layers`` is keyed by module qualified name, in model order."""

    layers: dict[str, LayerQuantConfig]
    version: int = 1
    batch_num: int = 1
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: tuple[str, ...] = ()

    def enabled_layers(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.quant_enable]
