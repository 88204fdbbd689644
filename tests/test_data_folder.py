"""prepare --dataset folder: tiny image folders of mixed sizes and formats (PNG, JPEG, BMP, GIF, a grey
image, an RGBA one) go through the real CLI and come back, resized and cropped, through the real reader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from data_prep import folders as folders_module
from data_prep.captions import captions_for_class
from data_prep.manifest import load_manifest
from data_prep.prepare import main
from data_prep.reader import read_samples

GREEN, JPEG_COLOUR, BMP_COLOUR, GIF_COLOUR = (0, 200, 0), (30, 60, 90), (5, 250, 128), (250, 120, 10)


def tricolour(width=16, height=8):
    """Left quarter red, middle half green, right quarter blue: a centre crop of the height is all green."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 4] = (255, 0, 0)
    pixels[:, width // 4: 3 * width // 4] = GREEN
    pixels[:, 3 * width // 4:] = (0, 0, 255)
    return Image.fromarray(pixels)


def half_transparent():
    """RGBA 8x8: left half opaque red, right half fully transparent (blue underneath)."""
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[:, :4] = (255, 0, 0, 255)
    pixels[:, 4:] = (0, 0, 255, 0)
    return Image.fromarray(pixels, "RGBA")


def expected_rgb():
    """name -> the 8x8x3 image prepare must give for it (from the colours alone)."""
    def solid(colour):
        return np.broadcast_to(np.array(colour, np.uint8), (8, 8, 3))
    rgba = np.zeros((8, 8, 3), np.uint8)
    rgba[:, :4] = (255, 0, 0)
    rgba[:, 4:] = 255  # transparent -> white
    return {"apple/tri.png": solid(GREEN), "apple/solid.jpg": solid(JPEG_COLOUR), "apple/grey.png": solid((77,) * 3),
            "zebra_crossing/rgba.png": rgba, "zebra_crossing/tall.bmp": solid(BMP_COLOUR),
            "zebra_crossing/pal.gif": solid(GIF_COLOUR)}


def make_folder(root: Path) -> Path:
    """Two classes, six formats and sizes; nothing is exactly 8x8 RGB except the RGBA one."""
    for name in ("apple", "zebra_crossing"):
        (root / name).mkdir(parents=True)
    tricolour().save(root / "apple/tri.png")                                     # 16x8: crop the middle
    Image.new("RGB", (12, 12), JPEG_COLOUR).save(root / "apple/solid.jpg", quality=95)   # shrink
    Image.new("L", (10, 14), 77).save(root / "apple/grey.png")                   # grey, shrink + crop
    half_transparent().save(root / "zebra_crossing/rgba.png")
    Image.new("RGB", (12, 24), BMP_COLOUR).save(root / "zebra_crossing/tall.bmp")  # tall: crop rows
    palette = Image.new("RGB", (5, 7), GIF_COLOUR).convert("P", palette=Image.Palette.ADAPTIVE)  # exact colour
    palette.save(root / "zebra_crossing/pal.gif")                               # grow
    (root / "README.txt").write_text("not an image: ignored")
    return root


def make_test_folder(root: Path) -> Path:
    (root / "apple").mkdir(parents=True)
    (root / "zebra_crossing").mkdir(parents=True)
    Image.new("RGB", (9, 9), (1, 2, 3)).save(root / "apple/t.png")
    Image.new("RGB", (8, 20), (4, 5, 6)).save(root / "zebra_crossing/t.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("folders")
    return make_folder(base / "train"), make_test_folder(base / "test")


def prepare_cli(*arguments) -> int:
    return main([*map(str, arguments), "--no-progress"])


def read_split(out, split):
    """(seqs uint8 [N, L], labels, captions) of a split through the reader the trainer uses."""
    total = load_manifest(out).splits[split].total
    batch = read_samples(out, range(total), split=split)
    return batch.seqs.numpy(), batch.labels.numpy(), batch.captions


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_mixed_formats_come_back_resized_cropped_and_labelled(folders, tmp_path):
    train, test = folders
    out = tmp_path / "out"
    assert prepare_cli("--dataset", "folder", "--root", train, "--test-root", test, "--size", "8x8",
                       "--channels", "3", "--out", out, "--shard-size", "4") == 0
    manifest = load_manifest(out)
    assert (manifest.height, manifest.width, manifest.channels, manifest.bins) == (8, 8, 3, 256)
    assert manifest.class_names == ["apple", "zebra_crossing"]
    assert manifest.source["captions"] == "templates" and manifest.source["ignored_files"] == 1
    seqs, labels, captions = read_split(out, "train")
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1] and labels.tolist() != [0, 0, 0, 1, 1, 1]  # shuffled
    wanted = expected_rgb()
    found = set()
    for seq, label, caption in zip(seqs, labels, captions):
        image = seq.reshape(8, 8, 3).astype(int)
        matches = [name for name, pixels in wanted.items()
                   if np.abs(image - pixels).max() <= (3 if name.endswith(".jpg") else 0)]
        assert len(matches) == 1, image[..., 0]
        assert matches[0].startswith(manifest.class_names[label])
        assert caption in captions_for_class("folder", manifest.class_names[label])
        found.add(matches[0])
    assert found == set(wanted)
    seqs, labels, _ = read_split(out, "test")
    assert labels.tolist() == [0, 1]
    assert np.array_equal(seqs[0].reshape(8, 8, 3), np.broadcast_to(np.uint8([1, 2, 3]), (8, 8, 3)))
    assert np.array_equal(seqs[1].reshape(8, 8, 3), np.broadcast_to(np.uint8([4, 5, 6]), (8, 8, 3)))


def test_one_channel_exact_resize_and_a_non_square_size(folders, tmp_path):
    train, test = folders
    out = tmp_path / "grey"
    assert prepare_cli("--dataset", "folder", "--root", train, "--test-root", test, "--size", "8x8",
                       "--channels", "1", "--out", out) == 0
    seqs, _, _ = read_split(out, "train")
    assert seqs.shape == (6, 64)
    green_luma = np.asarray(Image.new("RGB", (1, 1), GREEN).convert("L"))[0, 0]
    values = {int(seq[0]) for seq in seqs if len(set(seq.tolist())) == 1}
    assert {77, int(green_luma)} <= values
    out = tmp_path / "exact"
    assert prepare_cli("--dataset", "folder", "--root", train, "--test-root", test, "--size", "6x10",
                       "--channels", "3", "--resize", "exact", "--out", out) == 0
    manifest = load_manifest(out)
    assert (manifest.height, manifest.width, manifest.seq_len) == (6, 10, 180)
    images = read_split(out, "train")[0].reshape(-1, 6, 10, 3)
    # the 16x8 tricolour squeezed, not cropped: red on the left, blue on the right
    (squeezed,) = [im for im in images if tuple(im[0, 0]) == (255, 0, 0) and tuple(im[0, -1]) == (0, 0, 255)]
    assert tuple(squeezed[3, 5]) == GREEN


def test_flat_folder_is_one_class_and_test_fraction_is_seeded(tmp_path):
    root = tmp_path / "my_photos"
    root.mkdir()
    for index in range(20):
        Image.new("RGB", (6, 5), (index * 10, 0, 0)).save(root / f"{index:02d}.png")
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert prepare_cli("--dataset", "folder", "--root", root, "--test-fraction", "0.25", "--seed", seed,
                           "--size", "4x4", "--channels", "3", "--out", tmp_path / name) == 0
        runs[name] = {split: sorted(int(s[0]) for s in read_split(tmp_path / name, split)[0])
                      for split in ("train", "test")}
    manifest = load_manifest(tmp_path / "a")
    assert manifest.class_names == ["my_photos"] and manifest.source["test_fraction"] == 0.25
    assert len(runs["a"]["test"]) == 5 and len(runs["a"]["train"]) == 15
    assert sorted(runs["a"]["train"] + runs["a"]["test"]) == [i * 10 for i in range(20)]
    assert runs["a"] == runs["b"] and runs["a"]["test"] != runs["c"]["test"]


def test_sixteen_bit_grey_keeps_its_top_byte(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(root / "a.png")  # PIL's convert("L") gives 255
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(root / "b.png")
    assert prepare_cli("--dataset", "folder", "--root", root, "--test-fraction", "0.5", "--size", "4x4",
                       "--channels", "1", "--out", tmp_path / "o") == 0
    values = {int(seq[0]) for split in ("train", "test") for seq in read_split(tmp_path / "o", split)[0]}
    assert values == {40000 >> 8, 1000 >> 8}


def test_same_arguments_give_byte_identical_folders(folders, tmp_path, monkeypatch):
    train, _ = folders
    arguments = ["--dataset", "folder", "--root", train, "--test-fraction", "0.5", "--size", "8x8", "--channels", "3",
                 "--bins", "16", "--order", "patch:4", "--seed", "5"]
    assert prepare_cli(*arguments, "--out", tmp_path / "a") == 0
    assert prepare_cli(*arguments, "--out", tmp_path / "b") == 0
    monkeypatch.setattr(folders_module, "PARALLEL_MIN_IMAGES", 1)  # decode in 2 processes this time
    assert prepare_cli(*arguments, "--out", tmp_path / "c", "--workers", "2") == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert "manifest.json" in names
    for other in ("b", "c"):
        assert names == sorted(os.listdir(tmp_path / other))
        for name in names:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / other / name).read_bytes(), (other, name)


@pytest.mark.parametrize("change, difference", [
    (("--size", "6x6"), "size '8x8' there, '6x6' now"),
    (("--channels", "1"), "channels 3 there, 1 now"),
    (("--test-fraction", "0.5"), "test_root"),
])
def test_out_prepared_from_another_size_channels_or_test_root_is_refused(folders, tmp_path, capsys, change,
                                                                        difference):
    train, test = folders
    out = tmp_path / "out"
    assert prepare_cli("--dataset", "folder", "--root", train, "--test-root", test, "--size", "8x8",
                       "--channels", "3", "--out", out) == 0
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    asked = {"--size": "8x8", "--channels": "3", "--test-root": test, **dict([change])}
    if "--test-fraction" in asked:
        del asked["--test-root"]
    flags = [item for pair in asked.items() for item in pair]
    assert prepare_cli("--dataset", "folder", "--root", train, *flags, "--out", out) == 2
    line = error_line(capsys)
    assert str(out) in line and difference in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before


def test_a_corrupt_file_stops_prepare_naming_it_unless_skip_bad(folders, tmp_path, capsys):
    train, test = folders
    root = tmp_path / "src"
    make_folder(root)
    bad = root / "zebra_crossing" / "broken.jpg"
    bad.write_bytes((root / "apple/solid.jpg").read_bytes()[:200])  # a truncated JPEG
    arguments = ["--dataset", "folder", "--root", root, "--test-root", test, "--size", "8x8", "--channels", "3"]
    assert prepare_cli(*arguments, "--out", tmp_path / "o") == 1
    line = error_line(capsys)
    assert str(bad) in line and "--skip-bad" in line
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert prepare_cli(*arguments, "--out", tmp_path / "o", "--skip-bad") == 0
    assert "6 train, 2 test, 1 unreadable file skipped" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "o")
    assert manifest.source["skipped_bad"] == 1 and manifest.source["skipped_bad_files"] == [str(bad)]
    assert manifest.splits["train"].total == 6


def test_cli_summary_and_verify(folders, tmp_path):
    train, test = folders
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--dataset", "folder", "--root", str(train),
                           "--test-root", str(test), "--size", "8x8", "--channels", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "8 images (6 train, 2 test)" in done.stdout
    checked = subprocess.run([sys.executable, "-m", "data_prep.verify", str(out)], capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode == 0 and "OK" in checked.stdout


@pytest.mark.parametrize("arguments, message", [
    (["--channels", "3"], "--size is required"),
    (["--size", "8x8"], "--channels is required"),
    (["--size", "8by8", "--channels", "3"], "--size '8by8' not understood"),
    (["--size", "8x8", "--channels", "2"], "--channels must be 1"),
    (["--size", "8x8", "--channels", "3", "--resize", "stretch"], "--resize 'stretch' unknown"),
    (["--size", "8x8", "--channels", "3", "--test-fraction", "0.2", "--test-root", "."], "either --test-root"),
    (["--size", "8x8", "--channels", "3", "--test-fraction", "1.5"], "--test-fraction must lie"),
    (["--size", "6x6", "--channels", "3", "--order", "patch:4"], "does not divide"),
])
def test_bad_folder_arguments_exit_2(folders, tmp_path, capsys, arguments, message):
    assert prepare_cli("--dataset", "folder", "--root", folders[0], "--out", tmp_path / "o", *arguments) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_folder_flags_are_refused_for_other_datasets(tmp_path, capsys):
    assert prepare_cli("--dataset", "digits", "--out", tmp_path / "o", "--size", "8x8") == 2
    assert "--size is only for --dataset folder" in error_line(capsys)


def test_test_root_with_an_unknown_class_is_named(folders, tmp_path, capsys):
    test = tmp_path / "test"
    (test / "cherry").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(test / "cherry" / "x.png")
    assert prepare_cli("--dataset", "folder", "--root", folders[0], "--test-root", test, "--size", "8x8",
                       "--channels", "3", "--out", tmp_path / "o") == 1
    assert "'cherry' is not a class folder" in error_line(capsys)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"image": image, "caption": caption}) + "\n" for image, caption in rows))
    return path


def test_captions_file_with_template_fallback(folders, tmp_path):
    train, test = folders
    jsonl = write_jsonl(tmp_path / "captions.jsonl", [("apple/tri.png", "a green square"),
                                                      ("zebra_crossing/rgba.png", "red and white, ünïcode"),
                                                      ("apple/t.png", "the test apple")])  # under --test-root
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text('image,caption\napple/tri.png,a green square\n'
                        'zebra_crossing/rgba.png,"red and white, ünïcode"\napple/t.png,the test apple\n')
    for name, captions in (("jsonl", jsonl), ("csv", csv_file)):
        out = tmp_path / name
        assert prepare_cli("--dataset", "folder", "--root", train, "--test-root", test, "--size", "8x8",
                           "--channels", "3", "--captions", captions, "--out", out) == 0
        manifest = load_manifest(out)
        assert manifest.source["captions"] == "file+templates" and manifest.source["captions_from_file"] == 3
        seqs, labels, got = read_split(out, "train")
        by_image = {}
        for seq, label, caption in zip(seqs, labels, got):
            by_image[(int(seq[0]), int(seq[1]), int(seq[2]), int(seq[-1]))] = (label, caption)
        assert by_image[(0, 200, 0, 0)] == (0, "a green square")
        assert by_image[(255, 0, 0, 255)] == (1, "red and white, ünïcode")
        templated = [caption for label, caption in by_image.values()
                     if caption not in ("a green square", "red and white, ünïcode")]
        assert len(templated) == 4
        assert all(c in captions_for_class("folder", "apple") + captions_for_class("folder", "zebra_crossing")
                   for c in templated)
        assert read_split(out, "test")[2][0] == "the test apple"


@pytest.mark.parametrize("rows, message", [
    ([("apple/tri.png", "x" * 49)], "apple/tri.png (caption from"),
    ([("apple/nope.png", "a caption")], "no image apple/nope.png"),
    ([("apple/tri.png", "a"), ("./apple/tri.png", "b")], "a second caption for ./apple/tri.png"),
])
def test_bad_captions_are_named_at_prepare_time(folders, tmp_path, capsys, rows, message):
    captions = write_jsonl(tmp_path / "c.jsonl", rows)
    assert prepare_cli("--dataset", "folder", "--root", folders[0], "--test-root", folders[1], "--size", "8x8",
                       "--channels", "3", "--captions", captions, "--out", tmp_path / "o") == 1
    line = error_line(capsys)
    assert message in line
    if "49" in str(rows):
        assert "49 bytes" in line and "limit of 48" in line


def test_trainer_and_sampler_need_no_change_for_a_prepared_folder(folders, tmp_path):
    # the manifest carries shape, bins, order and class names: train a few steps on a folder of mixed
    # sizes and formats through the real command lines, then draw a grid from the run
    train, test = folders
    out = tmp_path / "prepared"
    assert prepare_cli("--dataset", "folder", "--root", train, "--test-root", test, "--out", out,
                       "--size", "8x8", "--channels", "3") == 0
    repo = Path(__file__).resolve().parent.parent
    run = tmp_path / "run"
    sets = ["data.dir=" + str(out), "train.run_dir=" + str(run), "train.max_steps=3", "train.eval_every=3",
            "train.checkpoint_every=3", "train.n_samples=2", "train.batch_size=4", "train.eval_batch_size=4",
            "model.n_layers=1", "model.n_heads=2", "model.d_query=4", "model.d_ff=16", "log.progress_bar=false",
            "data.num_workers=0", "data.shuffle_buffer=10", "train.eval_at_start=false"]
    command = [sys.executable, str(repo / "train" / "run.py"), "--config", str(repo / "configs" / "digits.yaml")]
    for value in sets:
        command += ["--set", value]
    trained = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=repo)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "eval" in trained.stdout
    # the demo config's model.row_len: auto is the data's row, 8 RGB pixels, stored resolved
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["row_len"] == 24
    grid = tmp_path / "grid.png"
    sampled = subprocess.run([sys.executable, str(repo / "sample" / "run.py"), "--checkpoint", str(run),
                              "--out", str(grid), "--classes", "0-1", "--n", "2", "--no-progress", "--device", "cpu"],
                             capture_output=True, text=True, timeout=300, cwd=repo)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    with Image.open(grid) as picture:
        assert picture.size == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2)  # two classes x two images of 8x8
