"""model.export: self-describing, atomic model files."""

import dataclasses

import pytest
import torch

from model import ImageTransformer, ModelConfig
from model.export import export_payload, load_export, save_export

IMAGE = {"dataset": "digits", "height": 2, "width": 3, "channels": 1, "bins": 16, "order": "raster",
         "class_names": ["0", "1", "2"]}


def tiny(**overrides):
    values = dict(bins=16, seq_len=6, n_layers=2, n_heads=2, d_query=4, d_ff=16, head="logistic-mixture",
                  mixtures=2, condition="both", n_classes=3, caption_len=4)
    values.update(overrides)
    torch.manual_seed(0)
    return ImageTransformer(ModelConfig(**values)).eval()


def test_round_trip_gives_identical_logits(tmp_path):
    net = tiny()
    path = tmp_path / "export" / "model.pt"
    save_export(path, net, IMAGE, step=500)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left behind
    loaded, image, step = load_export(path)
    assert image == IMAGE and step == 500 and not loaded.training
    assert loaded.config == net.config
    seq = torch.randint(0, 16, (2, 6))
    labels = torch.tensor([0, 2])
    assert torch.equal(loaded(seq, labels, ["ab", "c"]), net(seq, labels, ["ab", "c"]))


def test_payload_layout():
    payload = export_payload(tiny(), IMAGE, 7)
    assert set(payload) == {"format", "model_config", "image", "step", "state_dict"}
    assert payload["format"] == 1 and payload["step"] == 7
    assert payload["model_config"] == dataclasses.asdict(tiny().config)


def test_missing_corrupt_and_foreign_files_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_export(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="corrupt"):
        load_export(garbage)
    truncated = tmp_path / "truncated.pt"
    save_export(truncated, tiny(), IMAGE, 1)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        load_export(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": 99}, foreign)
    with pytest.raises(ValueError, match="format 99"):
        load_export(foreign)
    torch.save({"weights": 1}, foreign)
    with pytest.raises(ValueError, match="no 'format'"):
        load_export(foreign)


def test_bad_config_or_weights_in_export_are_value_errors(tmp_path):
    payload = export_payload(tiny(), IMAGE, 1)
    payload["model_config"]["n_layer"] = 3
    torch.save(payload, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="unknown key 'n_layer'"):
        load_export(tmp_path / "a.pt")
    payload = export_payload(tiny(), IMAGE, 1)
    payload["model_config"]["n_layers"] = 3
    torch.save(payload, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="weights do not match"):
        load_export(tmp_path / "b.pt")


def test_backend_not_installed_here_falls_back_to_auto(tmp_path, monkeypatch):
    import model.export as export
    payload = export_payload(tiny(), IMAGE, 1)
    payload["model_config"]["backend"] = "fla"  # trained on a GPU with flash-linear-attention
    torch.save(payload, tmp_path / "gpu.pt")
    monkeypatch.setattr(export, "backend_available", lambda name: name in ("auto", "torch"))
    with pytest.warns(RuntimeWarning, match="not installed here"):
        net, _, _ = load_export(tmp_path / "gpu.pt")
    assert net.config.backend == "auto"
    net, _, _ = load_export(tmp_path / "gpu.pt", backend="torch")
    assert net.config.backend == "torch"


def test_export_written_before_condition_inject_existed_loads_as_prefix_only(tmp_path):
    torch.manual_seed(0)
    net = ImageTransformer(ModelConfig(bins=8, seq_len=12, n_layers=1, n_heads=2, d_query=4, d_ff=8,
                                       condition="class", n_classes=3, condition_inject="prefix"))
    payload = export_payload(net, {"height": 3, "width": 4, "channels": 1, "bins": 8, "order": "raster"}, 5)
    del payload["model_config"]["condition_inject"]  # as main wrote it before the key existed
    torch.save(payload, tmp_path / "old.pt")
    loaded, _, _ = load_export(tmp_path / "old.pt")
    assert loaded.config.condition_inject == "prefix"
    seq = torch.randint(0, 8, (2, 12))
    assert torch.equal(loaded(seq, torch.tensor([0, 2])), net.eval()(seq, torch.tensor([0, 2])))
