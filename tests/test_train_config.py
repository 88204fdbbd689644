"""Config loading, coercion and errors; learning-rate schedule; checkpoint bookkeeping (no model needed)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

import train.config as config
from common.run_layout import complete_checkpoints
from model import ImageTransformer, ModelConfig
from train.checkpoint import (CheckpointError, check_compatible, checkpoint_damage, model_config_differences,
                              prune_checkpoints, read_meta, remove_stale_temporaries, resolve_resume)
from train.config import ConfigError, load_config, parse_yaml, write_config
from train.schedule import learning_rate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_scalars_are_coerced_to_field_types(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1e-4\n  betas: [0.9, 0.95]\ntrain:\n  max_steps: 1e3\n"
                           "  mixed_precision: no\n  deterministic: true\nmodel:\n  d_value: null\n")
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.mixed_precision == "no"  # not YAML 1.1's False
    assert cfg.train.deterministic is True
    assert cfg.model.d_value == cfg.model.d_query == 32  # null: the model's own default, d_query


def test_overrides_win_and_are_coerced(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 10\n")
    cfg = load_config(path, ["optim.lr=2e-4", "train.max_steps=7", "train.mixed_precision=no",
                             "model.d_value=16", "optim.betas=[0.8,0.9]", "train.deterministic=true",
                             "data.dir=some/where"])
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.train.mixed_precision) == (2e-4, 7, "no")
    assert cfg.model.d_value == 16 and cfg.optim.betas == (0.8, 0.9) and cfg.train.deterministic
    assert cfg.data.dir == "some/where"


@pytest.mark.parametrize("text, overrides, words", [
    ("train:\n  max_steps: 5\n  bogus: 1\n", [], ["c.yaml", "train.bogus", "unknown key"]),
    ("nonsense:\n  a: 1\ntrain:\n  max_steps: 5\n", [], ["c.yaml", "nonsense", "unknown section"]),
    ("train:\n  max_steps: five\n", [], ["c.yaml", "train.max_steps", "'five'"]),
    ("train:\n  max_steps: 5\noptim:\n  lr: fast\n", [], ["c.yaml", "optim.lr", "'fast'"]),
    ("train:\n  max_steps: 5\n  deterministic: maybe\n", [], ["c.yaml", "train.deterministic"]),
    ("train:\n  max_steps: 5\n  mixed_precision: fp8\n", [], ["c.yaml", "train.mixed_precision", "fp8"]),
    ("train:\n  max_steps: 5\n  mixed_precision: fp16\noptim:\n  name: muon\n", [], ["c.yaml", "muon", "fp16"]),
    ("train:\n  max_steps: 5\noptim:\n  betas: [0.9]\n", [], ["c.yaml", "optim.betas"]),
    ("train:\n  max_steps: 5\n", ["train.batch_size=0"], ["--set train.batch_size=0", "> 0"]),
    ("train:\n  max_steps: 5\n", ["train.nope=1"], ["--set train.nope=1", "unknown key"]),
    ("train:\n  max_steps: 5\n", ["optim.lr=abc"], ["--set optim.lr=abc", "optim.lr"]),
    ("train:\n  max_steps: 5\n", ["lr=1"], ["--set lr=1", "section.key"]),
    ("train:\n  max_steps: 5\n", ["optim.lr"], ["--set optim.lr", "section.key=value"]),
    ("train:\n  max_steps: 5\n", ["optim.betas=[0.9"], ["--set optim.betas=[0.9", "optim.betas", "not valid YAML"]),
    ("train:\n  max_steps: 2.5\n", [], ["c.yaml", "train.max_steps", "integer"]),
    ("train: [1, 2]\n", [], ["c.yaml", "train", "mapping"]),
    ("train:\n  max_steps: [\n", [], ["c.yaml", "not valid YAML"]),
    # the model section is the model's own ModelConfig, checked by it, errors naming the key
    ("train:\n  max_steps: 5\nmodel:\n  n_layers: 0\n", [], ["c.yaml", "model.n_layers=0", ">= 1"]),
    ("train:\n  max_steps: 5\n", ["model.attention=local"], ["--set model.attention=local",
                                                             "model.attention='local'", "causal-linear, retention, gla"]),
    ("train:\n  max_steps: 5\nmodel:\n  backend: torch\n", [], ["c.yaml", "model.backend is now train.backend"]),
    ("train:\n  max_steps: 5\n", ["train.backend=cuda"], ["--set train.backend", "auto, torch"]),
    ("train:\n  max_steps: 5\n", ["train.chunk_size=0"], ["--set train.chunk_size", "> 0"]),
    ("train:\n  max_steps: 5\n", ["model.bins=1"], ["--set model.bins=1", "model.bins=1", ">= 2"]),
    ("train:\n  max_steps: 5\n", ["log.with=tensorbored"], ["--set log.with=tensorbored", "log.with",
                                                            "unknown tracker 'tensorbored'", "tensorboard, wandb"]),
])
def test_bad_values_give_one_line_errors(tmp_path, text, overrides, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_model_section_is_the_model_config_and_log_with_takes_one_tracker_or_several(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "get_available_trackers", lambda: ["tensorboard", "wandb"])
    path = write(tmp_path, "train:\n  max_steps: 5\nmodel:\n  d_query: 8\nlog:\n  with: [tensorboard, wandb]\n")
    cfg = load_config(path)
    assert type(cfg.model) is ModelConfig and cfg.model.d_value == 8  # resolved from the final d_query
    assert cfg.keys_set == {"train.max_steps", "model.d_query", "log.with"}
    assert cfg.log.with_ == ("tensorboard", "wandb")
    assert load_config(path, ["log.with=wandb"]).log.with_ == ("wandb",)
    assert load_config(path, ["log.with=[]"]).log.with_ == ()
    assert load_config(write(tmp_path, "train:\n  max_steps: 5\n")).log.with_ == ("tensorboard",)
    out = tmp_path / "run" / "config.yaml"
    write_config(cfg, str(out))
    assert "with:" in out.read_text() and load_config(str(out)) == cfg
    monkeypatch.setattr(config, "get_available_trackers", lambda: ["tensorboard"])
    with pytest.raises(ConfigError, match=r"--set log.with=wandb: log.with: tracker 'wandb' is not installed"):
        load_config(path, ["log.with=wandb"])


def test_shipped_configs_load_and_follow_the_paper():
    mnist = load_config(os.path.join(REPO, "configs", "mnist.yaml"))
    assert (mnist.model.n_layers, mnist.model.n_heads, mnist.model.d_query, mnist.model.d_ff) == (8, 8, 32, 1024)
    assert (mnist.model.head, mnist.model.mixtures, mnist.optim.name) == ("logistic-mixture", 10, "radam")
    assert mnist.optim.lr == pytest.approx(1e-4) and mnist.train.epochs == 250
    cifar = load_config(os.path.join(REPO, "configs", "cifar10.yaml"))
    assert cifar.model.n_layers == 16 and cifar.optim.lr == pytest.approx(2e-4)
    digits = load_config(os.path.join(REPO, "configs", "digits.yaml"))
    assert digits.model.condition == "class" and digits.train.max_steps > 0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  max_steps: 3\n  mixed_precision: no\n"), ["optim.lr=3e-5"])
    out = tmp_path / "run" / "config.yaml"
    write_config(cfg, str(out))
    again = load_config(str(out))
    assert again == cfg
    assert parse_yaml(out.read_text())["train"]["mixed_precision"] == "no"


def test_learning_rate_warms_up_then_follows_a_cosine():
    kwargs = dict(base_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, **kwargs) == pytest.approx(0.1)
    assert learning_rate(9, **kwargs) == pytest.approx(1.0)
    assert learning_rate(10, **kwargs) == pytest.approx(1.0)
    assert learning_rate(60, **kwargs) == pytest.approx(0.55)
    assert learning_rate(110, **kwargs) == pytest.approx(0.1)
    assert learning_rate(500, **kwargs) == pytest.approx(0.1)
    values = [learning_rate(s, **kwargs) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert learning_rate(50, base_lr=2.0, warmup_steps=0, total_steps=100, min_lr_ratio=1.0) == 2.0


def make_checkpoint(run_dir, step, complete=True, model_config=None):
    folder = os.path.join(run_dir, "checkpoints", f"step_{step:07d}")
    os.makedirs(folder)
    if complete:
        with open(os.path.join(folder, "meta.json"), "w") as handle:
            json.dump({"step": step, "model_config": model_config or {"n_layers": 2}, "image": {}}, handle)
    return folder


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    assert resolve_resume(run, "auto") is None
    make_checkpoint(run, 100)
    newest = make_checkpoint(run, 200)
    make_checkpoint(run, 300, complete=False)  # no meta.json: never chosen (choose_checkpoint sets it aside)
    os.makedirs(os.path.join(run, "checkpoints", "step_0000400.tmp-abcd"))
    assert resolve_resume(run, "auto") == newest
    assert [s for s, _ in complete_checkpoints(run)] == [100, 200]
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        resolve_resume(run, None)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(run, os.path.join(run, "checkpoints", "step_0000999"))
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(run, os.path.join(run, "checkpoints", "step_0000300"))
    # the sampler's --checkpoint takes a run folder; --resume says which of its checkpoints to pass
    with pytest.raises(CheckpointError, match=f"{run}: a run folder, not a checkpoint folder: .*newest {newest}"):
        resolve_resume(run, run)
    assert remove_stale_temporaries(run) == ["step_0000400.tmp-abcd"]
    prune_checkpoints(run, keep=1)
    assert [s for s, _ in complete_checkpoints(run)] == [200]


def test_resume_from_a_path_refuses_newer_checkpoints_in_the_run(tmp_path):
    """Pruning keeps the highest steps: resuming an older path beside newer ones would lose its saves."""
    run = str(tmp_path / "run")
    older = make_checkpoint(run, 100)
    newest = make_checkpoint(run, 200)
    assert resolve_resume(run, newest) == newest
    with pytest.raises(CheckpointError, match="holds newer checkpoints .*step_0000200"):
        resolve_resume(run, older)
    elsewhere = make_checkpoint(str(tmp_path / "other"), 50)  # e.g. starting from another run's weights
    with pytest.raises(CheckpointError, match="holds newer checkpoints"):
        resolve_resume(run, elsewhere)
    assert resolve_resume(str(tmp_path / "fresh"), elsewhere) == elsewhere


@pytest.mark.parametrize("edit, words", [
    ({"train_state": {"step": 2, "micro_batches": "two"}}, "train_state.micro_batches must be an integer, got 'two'"),
    ({"files": {"optimizer.bin": {"sha256": "ab"}}}, "files.optimizer.bin must hold an integer size"),
    ({"run": ["adamw"]}, "run must be an object, got ['adamw']"),
])
def test_an_edited_meta_json_is_refused_before_anything_is_loaded(edit, words, tmp_path):
    """meta.json is a file a user can edit; resuming reads its values, so their types are checked first."""
    folder = make_checkpoint(str(tmp_path / "run"), 2)
    meta_path = os.path.join(folder, "meta.json")
    with open(meta_path) as handle:
        meta = {**json.load(handle), **edit}
    with open(meta_path, "w") as handle:
        json.dump(meta, handle)
    with pytest.raises(CheckpointError) as caught:
        read_meta(folder)
    assert str(caught.value).startswith(f"{meta_path}: {words}"), caught.value
    assert checkpoint_damage(folder) == str(caught.value)  # --resume auto sets it aside like other damage


def test_home_in_path_keys_is_expanded_not_made_into_a_folder_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write(tmp_path, "data:\n  dir: ~/data/digits\ntrain:\n  max_steps: 1\n")
    cfg = load_config(path, ["train.run_dir=~/runs/digits"])
    assert (cfg.data.dir, cfg.train.run_dir) == (str(tmp_path / "data/digits"), str(tmp_path / "runs/digits"))


def test_model_config_mismatch_lists_the_keys(tmp_path):
    # checkpoints written before backend and chunk_size became train.* keys hold them: ignored
    saved = {"n_layers": 2, "n_heads": 4, "backend": "torch", "chunk_size": 64}
    folder = make_checkpoint(str(tmp_path), 10, model_config=saved)
    current = {"n_layers": 3, "n_heads": 4, "backend": "fla", "chunk_size": 32}
    assert model_config_differences(saved, current) == ["n_layers: checkpoint 2 != config 3"]
    with pytest.raises(CheckpointError, match="n_layers: checkpoint 2 != config 3"):
        check_compatible(folder, current)
    assert check_compatible(folder, {**current, "n_layers": 2})["step"] == 10


def test_training_defaults_to_a_class_conditional_model(tmp_path):
    # the model's own default is unconditional; a training config that leaves model.condition out
    # gets the class conditioning it had before the model section became ModelConfig
    assert load_config(write(tmp_path, "train:\n  max_steps: 5\n")).model.condition == "class"
    assert config.TrainConfig().model.condition == "class"
    cfg = load_config(write(tmp_path, "model:\n  condition: none\ntrain:\n  max_steps: 5\n"))
    assert cfg.model.condition == "none"


def test_row_len_defaults_to_the_datas_row_and_takes_a_number_or_auto(tmp_path):
    assert load_config(None, ["train.max_steps=1"]).model.row_len == "auto"  # resolved by the trainer
    assert load_config(None, ["train.max_steps=1", "model.row_len=28"]).model.row_len == 28
    with pytest.raises(ConfigError, match="model.row_len='wide' must be an integer"):
        load_config(None, ["train.max_steps=1", "model.row_len=wide"])
    with pytest.raises(ValueError, match="row_len='auto' is the data's row"):
        ImageTransformer(ModelConfig(row_len="auto"))


def test_a_checkpoint_written_before_a_model_key_existed_still_resumes(tmp_path):
    # meta.json of an older version lacks the keys added since (conv_kernel, condition_inject): they
    # count as the values that model had, so the checkpoint matches today's equivalent config
    current = dataclasses.asdict(ModelConfig(bins=16, seq_len=12, condition="class", condition_inject="prefix"))
    old = {key: value for key, value in current.items() if key not in ("conv_kernel", "condition_inject")}
    folder = make_checkpoint(str(tmp_path), 10, model_config=old)
    assert model_config_differences(old, current) == []
    assert check_compatible(folder, current)["step"] == 10
    assert model_config_differences(old, {**current, "conv_kernel": 5}) == [
        "conv_kernel: checkpoint 0 != config 5"]


def test_epochs_convert_to_steps_with_the_global_batch(tmp_path):
    from types import SimpleNamespace

    from train.trainer import resolve_max_steps

    manifest = SimpleNamespace(splits={"train": SimpleNamespace(total=60000)})
    cfg = load_config(write(tmp_path, "train:\n  epochs: 2\n  batch_size: 32\n  grad_accum: 2\n"))
    assert resolve_max_steps(cfg, manifest, world_size=1) == 1875  # 120000 / (32 x 2)
    assert resolve_max_steps(cfg, manifest, world_size=4) == 469  # ceil(120000 / 256)
    cfg = load_config(write(tmp_path, "train:\n  epochs: 2\n"), ["train.max_steps=7"])
    assert resolve_max_steps(cfg, manifest, world_size=1) == 7  # max_steps wins
    with pytest.raises(ConfigError, match="train.max_steps or train.epochs"):
        load_config(write(tmp_path, "optim:\n  lr: 1e-3\n"))


def test_no_weight_decay_on_norms_embeddings_and_biases():
    import torch

    from model import ImageTransformer, ModelConfig
    from train.optimizers import parameter_groups

    net = ImageTransformer(ModelConfig(bins=16, seq_len=12, n_layers=1, n_heads=2, d_query=4, d_ff=8,
                                       condition="class"))
    decay, no_decay = parameter_groups(net, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(name.endswith("weight") for name in decayed)
    embeddings = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Embedding)}
    norms = {id(p) for m in net.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    assert embeddings and norms
    assert not ({id(p) for p in decay["params"]} & (embeddings | norms))
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else(tmp_path):
    import torch

    from model import ImageTransformer
    from train.optimizers import build_optimizers

    cfg = load_config(write(tmp_path, "train:\n  max_steps: 5\noptim:\n  name: muon\n  lr: 2e-3\n"),
                      ["model.bins=16", "model.seq_len=12", "model.n_classes=10", "model.n_layers=2", "model.d_ff=8",
                       "model.condition_inject=film", "model.row_len=0"])
    net = ImageTransformer(cfg.model)
    muon, adamw = build_optimizers(net, cfg, torch.device("cpu"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in net.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert not in_muon & in_adamw and in_muon | in_adamw == set(names.values())
    # 2 blocks x (attention: query, key, value, out; feed-forward: 2; the condition projection)
    assert len(in_muon) == 14 and all(n.startswith("blocks.") and n.endswith(".weight") for n in in_muon)
    assert sum("condition_projection" in n for n in in_muon) == 2
    assert not any("embedding" in n or n.startswith("head") for n in in_muon)
    assert all(group["lr"] == 2e-3 for group in muon.param_groups + adamw.param_groups)


def test_imagenet_configs_load_for_one_node_of_eight():
    for name, side in (("imagenet32", 32), ("imagenet64", 64)):
        cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        assert cfg.data.dir == f"data/{name}" and cfg.train.mixed_precision == "bf16"
        assert cfg.train.epochs > 0 and cfg.model.head == "logistic-mixture"
        text = open(os.path.join(REPO, "configs", f"{name}.yaml")).read()
        assert "bits/dim" in text and f"{side}x{side}" in text


def test_checkpoint_from_before_condition_inject_counts_as_prefix_only():
    old = {"n_layers": 2, "condition": "class"}  # meta.json written before the key existed
    assert model_config_differences(old, {**old, "condition_inject": "prefix"}) == []
    assert model_config_differences(old, {**old, "condition_inject": "blocks"}) == [
        "condition_inject: checkpoint 'prefix' != config 'blocks'"]
