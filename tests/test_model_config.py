"""ModelConfig validation and the attention kinds' construction."""

import dataclasses

import pytest

import model.attention_ops as ops
from model import ModelConfig
from model.attention_layer import AttentionLayer
from model.attention_ops import KINDS


def test_defaults_resolve_d_value_and_d_model():
    cfg = ModelConfig(n_heads=4, d_query=16)
    assert cfg.d_value == 16
    assert cfg.d_model == 64
    assert ModelConfig(head="logistic-mixture", mixtures=5).head_dim == 15
    assert ModelConfig(bins=16).head_dim == 16


def test_asdict_round_trips_through_from_dict():
    cfg = ModelConfig(bins=16, seq_len=20, n_layers=3, attention="softmax", head="logistic-mixture",
                      condition="both", d_value=7, condition_dropout=0.25)
    assert ModelConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_from_dict_rejects_unknown_key():
    with pytest.raises(ValueError, match="n_layer'"):
        ModelConfig.from_dict({"n_layer": 4})


@pytest.mark.parametrize("key,value", [
    ("n_layers", 0), ("n_heads", "8"), ("d_query", 2.5), ("bins", True), ("dropout", 1.5),
    ("condition_dropout", -0.1), ("attention", "linear"), ("head", "mixture"),
    ("condition", "label"), ("mixtures", 0), ("caption_len", -1),
])
def test_from_dict_rejects_bad_values_naming_the_field(key, value):
    with pytest.raises(ValueError, match=f"{key}="):
        ModelConfig.from_dict({key: value})


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        ModelConfig.from_dict(["bins"])


def test_every_kind_builds_and_unknown_kind_or_backend_is_a_clear_error():
    for kind in KINDS:
        assert ModelConfig(attention=kind).attention == kind
        AttentionLayer(8, 2, 4, 4, kind, backend="torch", chunk_size=8)
    with pytest.raises(ValueError, match="unknown attention kind 'local'"):
        AttentionLayer(8, 2, 4, 4, "local")
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        AttentionLayer(8, 2, 4, 4, "causal-linear", backend="cuda")
    with pytest.raises(ValueError, match="causal-linear only, not 'gla'"):
        AttentionLayer(8, 2, 4, 4, "gla", backend="fast-transformers")


def test_model_config_holds_no_run_time_keys():
    # backend and chunk_size say how a model runs: not in ModelConfig, dropped from older stored dicts
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert not names & {"backend", "chunk_size"}
    assert ModelConfig.from_dict({"n_layers": 2, "backend": "fla", "chunk_size": 32}) == ModelConfig.from_dict({"n_layers": 2})


def test_attention_layer_parameter_names_match_fast_transformers_for_causal_linear_and_softmax():
    names = [sorted(AttentionLayer(8, 2, 4, 4, kind).state_dict()) for kind in ("causal-linear", "softmax")]
    assert names[0] == names[1]
    assert "query_projection.weight" in names[0]


def test_explicit_backend_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ops, "backend_available", lambda name: name in ("auto", "torch"))
    for name in ("fla", "fast-transformers"):
        with pytest.raises(ValueError, match=f"backend '{name}' is not installed"):
            AttentionLayer(8, 2, 4, 4, "causal-linear", backend=name)
    AttentionLayer(8, 2, 4, 4, "causal-linear", backend="auto")


def test_auto_backend_resolves_to_torch_on_cpu():
    import torch
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
