"""ModelConfig validation and the attention registry."""

import dataclasses

import pytest

import model.linear_backends as linear_backends
from model import ModelConfig
from model.attention_layer import AttentionLayer
from model.registry import ATTENTION_KINDS, build_attention


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
    ("condition_dropout", -0.1), ("attention", "linear"), ("backend", "cuda"), ("head", "mixture"),
    ("condition", "label"), ("chunk_size", 0), ("mixtures", 0), ("caption_len", -1),
])
def test_from_dict_rejects_bad_values_naming_the_field(key, value):
    with pytest.raises(ValueError, match=f"{key}="):
        ModelConfig.from_dict({key: value})


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        ModelConfig.from_dict(["bins"])


def test_registry_has_both_kinds_with_parameterless_twins():
    assert {"causal-linear", "softmax"} <= set(ATTENTION_KINDS)
    for name in ("causal-linear", "softmax"):
        batch, recurrent = build_attention(name)
        assert not list(batch.parameters()) and not list(recurrent.parameters())


def test_registry_rejects_unknown_kind_and_parameter():
    with pytest.raises(ValueError, match="unknown attention kind 'local'"):
        build_attention("local")
    with pytest.raises(ValueError, match="unknown parameter 'chunk_size'"):
        build_attention("softmax", chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size='8'"):
        build_attention("causal-linear", chunk_size="8")


def test_attention_layer_parameter_names_do_not_depend_on_the_kind():
    names = [sorted(AttentionLayer(8, 2, 4, 4, kind).state_dict()) for kind in ("causal-linear", "softmax")]
    assert names[0] == names[1]
    assert "query_projection.weight" in names[0]


def test_explicit_backend_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(linear_backends, "backend_available", lambda name: name in ("auto", "torch"))
    for name in ("fla", "fast-transformers"):
        with pytest.raises(ValueError, match=f"backend '{name}' is not installed"):
            build_attention("causal-linear", backend=name)
    build_attention("causal-linear", backend="auto")


def test_auto_backend_resolves_to_torch_on_cpu():
    import torch
    assert linear_backends.resolve_backend("auto", torch.device("cpu")) == "torch"
