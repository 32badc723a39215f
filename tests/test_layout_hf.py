"""The parameter table equals transformers' own names and shapes (tiny random models, no download)."""

from __future__ import annotations

import pytest

from reallm.layout import param_table
from reallm.spec import ModelSpec

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("critic", [False, True])
def test_param_table_matches_transformers(family, tied, critic):
    spec = ModelSpec(
        family,
        num_layers=2,
        hidden_size=16,
        intermediate_size=24,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        vocab_size=11,
        tie_word_embeddings=tied,
        qkv_bias=family == "qwen2",
        is_critic=critic,
    )
    cfg_dict = spec.to_hf_config()
    cfg = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    auto = transformers.AutoModelForTokenClassification if critic else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg)
    # named_parameters() lists a tied lm_head once, under the embedding's name: exactly our table.
    hf = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert hf == [(p.name, p.shape) for p in param_table(spec)]
