"""ImageTransformer.save_pretrained / from_pretrained: one folder, safetensors + JSON, written atomically."""

import json

import pytest
import torch

import common.files as files
import model.pretrained as pretrained
from model import ImageTransformer, ModelConfig

IMAGE = {"dataset": "digits", "height": 2, "width": 3, "channels": 1, "bins": 16, "order": "raster",
         "class_names": ["0", "1", "2"]}


def tiny(seed=0, **overrides):
    values = dict(bins=16, seq_len=6, n_layers=2, n_heads=2, d_query=4, d_ff=16, head="logistic-mixture",
                  mixtures=2, condition="both", n_classes=3, caption_len=4)
    values.update(overrides)
    torch.manual_seed(seed)
    return ImageTransformer(ModelConfig(**values)).eval()


def edit_config(folder, **changes):
    """Rewrite config.json of a model folder with changed top-level or model_config keys."""
    values = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        (values if key in values else values["model_config"])[key] = value
    (folder / "config.json").write_text(json.dumps(values))


def test_round_trip_gives_identical_logits_and_no_pickle(tmp_path):
    net = tiny()
    path = tmp_path / "export"
    net.save_pretrained(path, image=IMAGE, step=500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left behind
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())  # plain JSON: nothing to unpickle
    assert set(config) == {"format", "model_config", "image", "step"}
    assert config["format"] == 2 and config["step"] == 500 and config["image"] == IMAGE
    loaded = ImageTransformer.from_pretrained(path)
    assert loaded.image_info == IMAGE and loaded.trained_steps == 500 and not loaded.training
    assert loaded.config == net.config
    seq = torch.randint(0, 16, (2, 6))
    labels = torch.tensor([0, 2])
    assert torch.equal(loaded(seq, labels, ["ab", "c"]), net(seq, labels, ["ab", "c"]))
    loaded.save_pretrained(tmp_path / "again")  # image and step travel with the model
    again = ImageTransformer.from_pretrained(tmp_path / "again")
    assert (again.image_info, again.trained_steps) == (IMAGE, 500)


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path):
    def tie(net):
        net.blocks[1].feed_forward[0].weight = net.blocks[0].feed_forward[0].weight  # one tensor, two names
        return net

    net = tie(tiny())
    net.save_pretrained(tmp_path / "tied", IMAGE, 1)
    fresh = tie(tiny(seed=1))
    pretrained.load_weights(fresh, tmp_path / "tied")
    assert torch.equal(fresh.blocks[0].feed_forward[0].weight, net.blocks[0].feed_forward[0].weight)
    assert fresh.blocks[1].feed_forward[0].weight is fresh.blocks[0].feed_forward[0].weight
    seq = torch.randint(0, 16, (2, 6))
    assert torch.equal(fresh(seq, torch.tensor([0, 2])), net(seq, torch.tensor([0, 2])))


def test_a_failed_write_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    path = tmp_path / "export"
    old = tiny(seed=1)
    old.save_pretrained(path, IMAGE, 100)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    for where in ("save_model", "publish_folder"):  # while writing the weights; while renaming
        with monkeypatch.context() as patch:
            patch.setattr(pretrained, where, full_disk)
            with pytest.raises(OSError, match="No space"):
                tiny(seed=2).save_pretrained(path, IMAGE, 200)
        assert {p.name: p.read_bytes() for p in path.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # temporary removed
    # the rename itself fails: the old folder, already moved aside, is put back
    real_replace = files.os.replace
    with monkeypatch.context() as patch:
        patch.setattr(files.os, "replace",
                      lambda a, b: full_disk() if ".tmp-" in str(a) else real_replace(a, b))
        with pytest.raises(OSError):
            tiny(seed=2).save_pretrained(path, IMAGE, 200)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    tiny(seed=2).save_pretrained(path, IMAGE, 200)  # replaces the old folder whole
    assert ImageTransformer.from_pretrained(path).trained_steps == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_missing_corrupt_and_foreign_folders_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageTransformer.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        ImageTransformer.from_pretrained(tmp_path / "empty")
    folder = tmp_path / "m"
    tiny().save_pretrained(folder, IMAGE, 1)
    weights = (folder / "model.safetensors").read_bytes()
    for damaged in (b"not a safetensors file at all", weights[:200]):
        (folder / "model.safetensors").write_bytes(damaged)
        with pytest.raises(ValueError, match="model.safetensors is corrupt"):
            ImageTransformer.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: unreadable"):
        ImageTransformer.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        ImageTransformer.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"weights": 1}))
    with pytest.raises(ValueError, match="no 'format'"):
        ImageTransformer.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"format": 2, "model_config": {}, "step": 1}))
    with pytest.raises(ValueError, match="lacks the key 'image'"):
        ImageTransformer.from_pretrained(folder)


def test_old_pickled_export_gets_one_clear_line(tmp_path):
    old = tmp_path / "run" / "export" / "model.pt"
    old.parent.mkdir(parents=True)
    torch.save({"format": 1, "state_dict": {}}, old)
    for path in (old, old.parent):  # the file itself, or the export folder that holds it
        with pytest.raises(ValueError, match="earlier version .*no longer read; resume its run once") as error:
            ImageTransformer.from_pretrained(path)
        assert "\n" not in str(error.value)


def test_bad_config_or_weights_are_value_errors(tmp_path):
    tiny().save_pretrained(tmp_path / "a", IMAGE, 1)
    edit_config(tmp_path / "a", n_layer=3)
    with pytest.raises(ValueError, match="unknown key 'n_layer'"):
        ImageTransformer.from_pretrained(tmp_path / "a")
    tiny().save_pretrained(tmp_path / "b", IMAGE, 1)
    edit_config(tmp_path / "b", n_layers=3)  # a block the file has no weights for
    with pytest.raises(ValueError, match="weights do not match its config.json .missing 'blocks.2"):
        ImageTransformer.from_pretrained(tmp_path / "b")
    edit_config(tmp_path / "b", n_layers=1)
    with pytest.raises(ValueError, match="unexpected 'blocks.1"):
        ImageTransformer.from_pretrained(tmp_path / "b")
    edit_config(tmp_path / "b", n_layers=2, d_ff=8)
    with pytest.raises(ValueError, match="weights do not match its config.json: size mismatch"):
        ImageTransformer.from_pretrained(tmp_path / "b")


def test_folder_that_stored_backend_and_chunk_size_loads_and_runs_as_asked(tmp_path):
    # folders written before backend and chunk_size became run-time options hold them in model_config
    net = tiny()
    net.save_pretrained(tmp_path / "gpu", IMAGE, 1)
    assert "backend" not in json.loads((tmp_path / "gpu" / "config.json").read_text())["model_config"]
    edit_config(tmp_path / "gpu", backend="fla", chunk_size=32)  # trained on a GPU with flash-linear-attention
    loaded = ImageTransformer.from_pretrained(tmp_path / "gpu", backend="torch", chunk_size=4)
    assert loaded.config == net.config
    assert {(block.attention.backend, block.attention.chunk_size) for block in loaded.blocks} == {("torch", 4)}
    seq = torch.randint(0, 16, (2, 6))
    assert torch.allclose(loaded(seq, torch.tensor([0, 1]), ["a", "b"]), net(seq, torch.tensor([0, 1]), ["a", "b"]),
                          atol=1e-6)
    saved = tmp_path / "again"
    loaded.save_pretrained(saved)  # written back without them
    assert "chunk_size" not in json.loads((saved / "config.json").read_text())["model_config"]


def test_folder_written_before_condition_inject_existed_loads_as_prefix_only(tmp_path):
    net = tiny(condition="class", condition_inject="prefix")
    net.save_pretrained(tmp_path / "old", IMAGE, 5)
    values = json.loads((tmp_path / "old" / "config.json").read_text())
    del values["model_config"]["condition_inject"]  # as configs were written before the key existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(values))
    loaded = ImageTransformer.from_pretrained(tmp_path / "old")
    assert loaded.config.condition_inject == "prefix"
    seq = torch.randint(0, 16, (2, 6))
    assert torch.equal(loaded(seq, torch.tensor([0, 2])), net(seq, torch.tensor([0, 2])))


def test_saving_without_image_info_fails_at_once_and_writes_nothing(tmp_path):
    """A folder without the data's image format cannot be sampled: say so when saving, not when sampling."""
    with pytest.raises(ValueError, match="image info lacks one of height, width, channels, bins, order.*image="):
        tiny().save_pretrained(tmp_path / "plain")  # a fresh model knows no image format
    with pytest.raises(ValueError, match=r"does not match the model \(6 bytes, 16 bins\)"):
        tiny().save_pretrained(tmp_path / "plain", {**IMAGE, "height": 3}, 1)
    assert list(tmp_path.iterdir()) == []
