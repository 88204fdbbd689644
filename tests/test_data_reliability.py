"""Data from someone else never runs code, never miscounts and never ends in a traceback: symlink loops
in image folders, planted CIFAR pickles, bytes outside the levels in a shard, edited stored files."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import numpy as np
import pytest

from data_prep.errors import DataError
from test_sample_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sample_helpers import tiny_model, write_export
from test_train_run import cli_args, fresh_accelerate  # noqa: F401  (fixture)


def set_a_byte_beyond_the_levels(shard: str, value: int = 255) -> str:
    """Rewrite a tar shard with the first byte of its second sample set to `value`; returns that sample's key."""
    with tarfile.open(shard) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive.getmembers()]
    keys = sorted({member.name.split(".")[0] for member, _ in members})
    key = keys[1]
    with tarfile.open(shard + ".new", "w") as archive:
        for member, data in members:
            if member.name == f"{key}.seq.bin":
                data = bytes([value]) + data[1:]
            archive.addfile(member, io.BytesIO(data))
    os.replace(shard + ".new", shard)
    return key


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> str:
    """Digits at 8 levels: 64 train / 16 test images, 16 a shard."""
    from data_prep.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("levels") / "digits8"
    prepare(PrepareConfig(dataset="digits", out=str(out), bins=8, train_size=64, test_size=16, shard_size=16,
                          workers=1, progress=False))
    return str(out)


@pytest.fixture
def beyond_levels(digits8, tmp_path) -> tuple[str, str, str]:
    """A copy of digits8 with value 255 in one sample of one train and one test shard: (folder, train key, test key)."""
    data = str(tmp_path / "data")
    shutil.copytree(digits8, data)
    train_key = set_a_byte_beyond_the_levels(os.path.join(data, "train-000001.tar"))
    test_key = set_a_byte_beyond_the_levels(os.path.join(data, "test-000000.tar"))
    return data, train_key, test_key


# 6. bytes outside the manifest's levels ---------------------------------------------------------

def test_reader_names_the_shard_and_sample_of_a_byte_beyond_the_levels(beyond_levels):
    from data_prep.reader import eval_batches, read_samples, train_batches

    data, train_key, test_key = beyond_levels
    where = rf"test-000000.tar: sample {test_key} has value 255, outside the manifest's 8 levels"
    with pytest.raises(DataError, match=where):
        list(eval_batches(data, 4))
    with pytest.raises(DataError, match=where) as caught:
        list(eval_batches(data, 4, num_workers=2))
    assert "Traceback" not in str(caught.value)
    with pytest.raises(DataError, match=where):
        read_samples(data, range(16))
    with pytest.raises(DataError, match=rf"train-000001.tar: sample {train_key} has value 255"):
        for _ in train_batches(data, 8, num_workers=0, shuffle_buffer=4, epoch_batches=20):
            pass


def test_training_stops_with_one_line_naming_the_shard(beyond_levels, tmp_path, capsys, fresh_accelerate):
    from train.run import main as train_main

    data, train_key, _ = beyond_levels
    code = train_main(cli_args(data, tmp_path / "run", "train.max_steps=40", "train.eval_at_start=false",
                               "data.num_workers=0"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1, err[-2000:]
    assert len(errors) == 1 and f"train-000001.tar: sample {train_key} has value 255" in errors[0], err[-2000:]


def test_lit_eval_exits_1_naming_the_shard(beyond_levels, tmp_path, capsys):
    from data_prep.manifest import load_manifest
    from sample.evaluate import main as eval_main

    data, _, test_key = beyond_levels
    net = tiny_model(0, bins=8, seq_len=784, n_layers=1, d_ff=16, condition="class", n_classes=10)
    export = write_export(tmp_path / "export", net, 1, load_manifest(data).image_info())
    code = eval_main(["--checkpoint", str(export), "--data", data, "--n-per-class", "0", "--no-progress",
                      "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"test-000000.tar: sample {test_key} has value 255" in err and "Traceback" not in err, err


def test_lit_sample_completion_exits_1_naming_the_shard(beyond_levels, tmp_path, capsys):
    from data_prep.manifest import load_manifest
    from sample.run import main as sample_main

    data, _, test_key = beyond_levels
    net = tiny_model(0, bins=8, seq_len=784, n_layers=1, d_ff=16, condition="class", n_classes=10)
    export = write_export(tmp_path / "export", net, 1, load_manifest(data).image_info())
    code = sample_main(["--checkpoint", str(export), "--out", str(tmp_path / "grid.png"), "--data", data,
                        "--index", "0-15", "--offset", "700", "--n", "1", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert f"test-000000.tar: sample {test_key} has value 255" in err[0] and not (tmp_path / "grid.png").exists()


# 2. links in image folders ----------------------------------------------------------------------

def two_classes(root, per_class: int = 10):
    """root/a and root/b, per_class 4x4 PNGs each, class a all dark and class b all light."""
    from PIL import Image

    for name, value in (("a", 20), ("b", 230)):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            Image.new("L", (4, 4), value + index).save(root / name / f"{index:02d}.png")
    return root


def prepare_folder(root, out, *extra) -> int:
    from data_prep.prepare import main as prepare_main

    return prepare_main(["--dataset", "folder", "--root", str(root), "--size", "4x4", "--channels", "1",
                         "--out", str(out), "--no-progress", *map(str, extra)])


def test_a_link_loop_is_walked_once_and_labels_stay_right(tmp_path):
    from data_prep.manifest import load_manifest
    from data_prep.reader import read_samples

    root = two_classes(tmp_path / "images")
    os.symlink("..", root / "a" / "loop")  # a/loop/a/loop/... and a/loop/b: b's images under a
    os.symlink("00.png", root / "a" / "again.png")  # the same image twice in its class
    (root / "a" / "notes.txt").write_text("not an image")
    assert prepare_folder(root, tmp_path / "out", "--test-fraction", "0.2") == 0
    manifest = load_manifest(tmp_path / "out")
    assert (manifest.splits["train"].total, manifest.splits["test"].total) == (16, 4)
    assert manifest.source["ignored_files"] == 2  # notes.txt and the second link to 00.png
    labels, dark = [], []
    for split in ("train", "test"):
        batch = read_samples(tmp_path / "out", range(manifest.splits[split].total), split=split)
        labels += batch.labels.tolist()
        dark += (batch.seqs.numpy().max(axis=1) < 128).tolist()
        # every image differs (value + index per class): a repeat would show as two equal rows
    assert sorted(labels) == [0] * 10 + [1] * 10
    assert dark == [label == 0 for label in labels]  # class b's light images never labelled a
    seqs = np.concatenate([read_samples(tmp_path / "out", range(manifest.splits[s].total), split=s).seqs.numpy()
                           for s in ("train", "test")])
    assert len(np.unique(seqs, axis=0)) == 20  # test and train disjoint, nothing counted twice


def test_one_image_in_two_classes_is_refused(tmp_path, capsys):
    root = two_classes(tmp_path / "images", per_class=3)
    os.symlink(os.path.join("..", "a", "01.png"), root / "b" / "borrowed.png")
    assert prepare_folder(root, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b/borrowed.png is the image" in err[0] and "a/01.png" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_class_folder_linking_to_the_root_is_refused(tmp_path, capsys):
    root = two_classes(tmp_path / "images", per_class=3)
    os.symlink(".", root / "c")
    assert prepare_folder(root, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images/c: a link to" in err[0], err


@pytest.mark.parametrize("overlap", ["same folder", "linked image"])
def test_test_root_sharing_images_with_root_is_refused(overlap, tmp_path, capsys):
    root = two_classes(tmp_path / "images", per_class=3)
    if overlap == "same folder":
        test = root
    else:
        test = two_classes(tmp_path / "test", per_class=2)
        os.symlink(root / "b" / "02.png", test / "b" / "02-linked.png")
    assert prepare_folder(root, tmp_path / "out", "--test-root", test) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "share" in err[0] and "test images must not be trained on" in err[0], err
    assert not (tmp_path / "out").exists()


# 5. CIFAR-10 batches from someone else ----------------------------------------------------------

class _RunsCode:
    """Unpickling this calls os.system: what a planted CIFAR batch can do to a plain pickle.load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle.dump(entry, file, 2) writes it (the official files' format):
    byte strings as BINSTRING, numpy.core names, the array's bytes as one BINSTRING."""
    import struct

    def text(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value

    def small(value: int) -> bytes:
        return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)

    dtype = (b"cnumpy\ndtype\n" + text(b"u1") + small(0) + small(1) + b"\x87R"
             + b"(" + small(3) + text(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + small(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + small(0) + b"\x85" + text(b"b")
             + b"\x87R(" + small(1) + small(data.shape[0]) + small(data.shape[1]) + b"\x86" + dtype + b"\x89"
             + b"T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb")
    return (b"\x80\x02}(" + text(b"batch_label") + text(b"training batch 1 of 5") + text(b"data") + array
            + text(b"labels") + b"](" + b"".join(small(label) for label in labels) + b"eu.")


def test_a_python2_batch_in_the_official_format_loads(tiny_cifar, tmp_path):
    from data_prep.sources import load_cifar10

    root = tmp_path / "src"
    shutil.copytree(tiny_cifar.root, root)
    rng = np.random.default_rng(5)
    chw = rng.integers(0, 256, size=(10, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=10).tolist()
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(python2_batch(chw.reshape(10, 3072), labels))
    source = load_cifar10(str(root))
    assert np.array_equal(source.splits["train"].images[10:20], chw.transpose(0, 2, 3, 1))
    assert source.splits["train"].labels[10:20].tolist() == labels
    assert np.array_equal(source.splits["test"].images, tiny_cifar.splits["test"][0])


@pytest.mark.parametrize("name", ["data_batch_3", "batches.meta"])
def test_a_planted_cifar_batch_runs_no_code(name, tiny_cifar, tmp_path, capsys):
    import pickle

    from data_prep.prepare import main as prepare_main

    root = tmp_path / "src"
    shutil.copytree(tiny_cifar.root, root)
    planted = root / "cifar-10-batches-py" / name
    marker = tmp_path / "ran"
    entry = {"label_names": [str(i) for i in range(10)], "data": np.zeros((10, 3072), np.uint8),
             "labels": [0] * 10, "extra": _RunsCode(str(marker))}
    planted.write_bytes(pickle.dumps(entry, protocol=2))
    code = prepare_main(["--dataset", "cifar10", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists(), "unpickling the planted batch ran its code"
    assert code == 1 and len(err) == 1, err
    assert str(planted) in err[0] and "refused posix.system" in err[0], err
    assert not (tmp_path / "o").exists()


def test_download_leaves_the_md5_check_to_torchvision_and_reads_with_the_safe_reader(tiny_cifar_root, monkeypatch):
    import torchvision

    from data_prep import sources

    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda root, **kwargs: calls.append((root, kwargs)))
    monkeypatch.setattr(sources.pickle, "load", None)  # a plain unpickle anywhere would fail here
    source = sources.load_cifar10(str(tiny_cifar_root), download=True)
    assert calls == [(str(tiny_cifar_root), {"train": False, "download": True})]
    assert len(source.splits["train"].labels) == 50 and len(source.splits["test"].labels) == 20


# 5. every other file a user may receive: nothing in it is run ------------------------------------

def test_a_planted_object_in_an_imagenet_npz_is_refused(tmp_path, capsys):
    from data_prep.prepare import main as prepare_main
    from test_data_imagenet import make_imagenet

    root = tmp_path / "src"
    make_imagenet(root, 32, per_batch=1, n_val=1)
    planted = root / "Imagenet32_train_npz" / "train_data_batch_3.npz"
    marker = tmp_path / "ran"
    np.savez(planted, data=np.zeros((1, 3072), np.uint8), labels=np.array([_RunsCode(str(marker))], dtype=object))
    code = prepare_main(["--dataset", "imagenet32", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert code == 1 and len(err) == 1 and str(planted) in err[0], err


def test_a_config_file_naming_python_code_is_refused(tmp_path):
    from train.config import ConfigError, load_config

    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"train:\n  run_dir: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(str(config))
    assert not marker.exists()


def test_a_planted_classifier_cache_is_not_unpickled(tmp_path):
    import torch

    from sample.classifier import ClassifierSettings, _load_cached

    marker = tmp_path / "ran"
    cache = tmp_path / "classifier.pt"
    torch.save({"info": _RunsCode(str(marker)), "state_dict": {}}, cache)
    net, _, why = _load_cached(cache, "digest", ClassifierSettings(), "cpu")
    assert net is None and why.startswith("unreadable cache") and not marker.exists()


def test_accelerate_load_state_reads_checkpoint_files_weights_only(tmp_path):
    """accelerate.load_state reads optimizer.bin, scheduler.bin, random_states_N.pkl ... through
    accelerate.utils.load, which defaults to torch.load(weights_only=True); a version that changes
    that would unpickle a planted checkpoint file."""
    import torch
    from accelerate.utils import load

    marker = tmp_path / "ran"
    planted = tmp_path / "optimizer.bin"
    torch.save({"state": _RunsCode(str(marker))}, planted)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load(planted, map_location="cpu")
    assert not marker.exists()


# 8. stored files a user can edit: manifest.json -------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("bins", 300, "bins must be in 2..256, got 300"),  # was accepted: a model of 300 levels over bytes
    ("channels", 2, "channels must be 1 or 3"),
    ("height", 0, "height must be at least 1"),
    ("dataset", "mystery", "dataset must be one of"),
    ("class_names", "0123456789", "class_names must be a list of strings"),  # was 10 classes, one a letter
    ("source", [1], "source must be an object"),
    ("counts", ["x"], "count 'x' of test-000000.tar must be an integer"),  # was a ValueError traceback
    ("counts", [16.7], "count 16.7 of test-000000.tar"),  # was read as 16
    ("shards", 5, "shards, counts and sha256 must be lists"),  # was a TypeError traceback
    ("shards", ["/etc/hostname"], "shard '/etc/hostname' must be a file name in the folder"),
    ("shards", ["../digits8/test-000000.tar"], "must be a file name in the folder"),
])
def test_an_edited_manifest_is_named_by_verify(key, value, message, digits8, tmp_path, capsys):
    import json

    from data_prep.verify import main as verify_main

    data = tmp_path / "data"
    shutil.copytree(digits8, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (manifest["splits"]["test"] if key in ("counts", "shards") else manifest)[key] = value
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert verify_main([str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0] and message in err[0], err


def test_the_trainer_names_an_edited_manifest_before_training(digits8, tmp_path, capsys, fresh_accelerate):
    import json

    from train.run import main as train_main

    data = tmp_path / "data"
    shutil.copytree(digits8, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["bins"] = 300  # the bytes are < 256 < 300: before, a 300-level model trained without a word
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert train_main(cli_args(str(data), tmp_path / "run", "train.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert "manifest.json: bins must be in 2..256, got 300" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


# 8. outputs that cannot be written: found before the work, one line, exit 2 -----------------------

def test_prepare_out_that_cannot_be_written_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    from data_prep import prepare as prepare_module

    (tmp_path / "afile").write_text("a file, not a folder")
    monkeypatch.setattr(prepare_module, "load_source", None)  # reading the source would fail here
    code = prepare_module.main(["--dataset", "digits", "--out", str(tmp_path / "afile" / "sub"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--out" in err[0] and "cannot write there (not a folder" in err[0] and "afile" in err[0], err


@pytest.fixture(scope="module")
def digits8_export(digits8, tmp_path_factory):
    """A tiny class-conditional model over digits8's images."""
    from data_prep.manifest import load_manifest

    net = tiny_model(0, bins=8, seq_len=784, n_layers=1, d_ff=16, condition="class", n_classes=10)
    return write_export(tmp_path_factory.mktemp("export") / "export", net, 1, load_manifest(digits8).image_info())


@pytest.mark.parametrize("where", ["under a file", "per-image folder is a file", "unwritable"])
def test_lit_sample_out_that_cannot_be_written_is_refused_before_sampling(where, digits8_export, tmp_path, capsys,
                                                                         monkeypatch):
    from sample import pipeline
    from sample.run import main as sample_main

    (tmp_path / "afile").write_text("a file, not a folder")
    extra = []
    if where == "under a file":
        out = tmp_path / "afile" / "grid.png"
    elif where == "per-image folder is a file":
        out, extra = tmp_path / "afile.png", ["--per-image"]
    else:
        if not os.path.isdir("/proc/self"):
            pytest.skip("needs /proc (a folder nobody, root included, can create files in)")
        out = "/proc/grid.png"
    monkeypatch.setattr(pipeline, "generate_images", None)  # sampling would fail here
    code = sample_main(["--checkpoint", str(digits8_export), "--out", str(out), "--n", "2", "--no-progress",
                        "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(out).removesuffix(".png") in err[0], err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (unwritable even for root)")
def test_lit_eval_json_that_cannot_be_written_is_refused_before_evaluating(digits8, digits8_export, capsys,
                                                                          monkeypatch):
    from sample import evaluate

    monkeypatch.setattr(evaluate, "evaluate", None)  # evaluating would fail here
    code = evaluate.main(["--checkpoint", str(digits8_export), "--data", digits8, "--json", "/proc/eval.json",
                          "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--json /proc/eval.json: cannot write there" in err[0], err


# 8. values accepted in one spelling and refused in another ---------------------------------------

@pytest.mark.parametrize("name, text", [
    ("captions.csv", "image,caption\r\na/00.png,a dark square\r\nb/01.png,a light square\r\n"),
    ("captions.jsonl", '{"image": "a/00.png", "caption": "a dark square"}\n'
                       '{"image": "b/01.png", "caption": "a light square"}\n'),
])
def test_a_captions_file_saved_as_utf8_with_a_byte_order_mark_reads_like_one_without(name, text, tmp_path):
    from data_prep.captions import read_captions_file

    plain, marked = tmp_path / name, tmp_path / f"bom-{name}"
    plain.write_text(text, encoding="utf-8", newline="")
    marked.write_text(text, encoding="utf-8-sig", newline="")  # Excel's "CSV UTF-8", Notepad's "UTF-8 with BOM"
    expected = {"a/00.png": "a dark square", "b/01.png": "a light square"}
    for path in (plain, marked):
        assert {key: caption for key, (caption, _) in read_captions_file(str(path)).items()} == expected


@pytest.mark.parametrize("device, message", [("CPU", "--device 'CPU': not a torch device"),
                                             ("cuda:7", "--device cuda:7: ")])
def test_lit_eval_device_is_checked_like_lit_sample(device, message, digits8, digits8_export, capsys):
    import torch

    from sample.evaluate import main as eval_main

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code = eval_main(["--checkpoint", str(digits8_export), "--data", digits8, "--n-per-class", "0",
                      "--no-progress", "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_lit_sample_completing_a_sample_beyond_the_levels_fails_naming_the_shard(beyond_levels, digits8_export,
                                                                                 tmp_path, capsys):
    from sample.run import main as sample_main

    data, _, test_key = beyond_levels
    args = ["--checkpoint", str(digits8_export), "--data", data, "--offset", "10", "--n", "1", "--no-progress",
            "--device", "cpu", "--out", str(tmp_path / "c.png")]
    assert sample_main([*args, "--index", "1"]) == 1  # a damaged shard: a failure, as in lit-eval (was exit 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"test-000000.tar: sample {test_key} has value 255" in err[0], err
    assert sample_main([*args, "--index", "16"]) == 2  # a wrong flag stays bad usage
    assert "--index 16: out of range for split 'test'" in capsys.readouterr().err
