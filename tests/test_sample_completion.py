"""Completion from the prepared test split: the first K bytes of each real image are kept exactly."""

import numpy as np
from PIL import Image

from data_prep.manifest import load_manifest
from data_prep.reader import read_samples
from model import ImageTransformer, ModelConfig
from sample.run import main
from test_sample_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sample_helpers import write_export


def digits_model(tmp_path, prepared_digits, condition="class"):
    info = load_manifest(prepared_digits).image_info()
    config = ModelConfig(bins=info["bins"], seq_len=info["height"] * info["width"] * info["channels"],
                         n_layers=1, n_heads=2, d_query=8, d_ff=16, condition=condition, n_classes=10)
    return write_export(tmp_path / "export", ImageTransformer(config).eval(), info=info)


def test_completion_keeps_the_real_prefix_and_lays_out_real_kept_completions(tmp_path, prepared_digits):
    export = digits_model(tmp_path, prepared_digits)
    out = tmp_path / "complete.png"
    code = main(["--checkpoint", str(export), "--out", str(out), "--data", str(prepared_digits),
                 "--index", "3-4,7", "--offset", "700", "--n", "2", "--npz", "--per-image",
                 "--no-progress", "--device", "cpu"])
    assert code == 0
    real = read_samples(prepared_digits, [3, 4, 7]).seqs.numpy()  # (3, 784)
    saved = np.load(tmp_path / "complete.npz")
    seqs = saved["sequences"]  # (6, 784): two completions per real image
    assert seqs.shape == (6, 784)
    assert np.array_equal(seqs[:, :700], np.repeat(real[:, :700], 2, axis=0))
    assert not np.array_equal(seqs[:, 700:], np.repeat(real[:, 700:], 2, axis=0))
    assert saved["labels"].tolist() == np.repeat(read_samples(prepared_digits, [3, 4, 7]).labels.numpy(), 2).tolist()
    with Image.open(out) as grid:  # rows: real, kept part, 2 completions; 28x28 cells, padding 2
        assert grid.size == (4 * 30 + 2, 3 * 30 + 2)
        first_cell = np.asarray(grid.convert("L"))[2:30, 2:30]
    assert np.array_equal(first_cell, real[0].reshape(28, 28))  # bins 256: levels are pixel values
    names = sorted(p.name for p in (tmp_path / "complete").iterdir())
    assert "index3_real.png" in names and "index7_completion001.png" in names and len(names) == 9


def test_completion_bad_inputs(tmp_path, prepared_digits, capsys):
    export = digits_model(tmp_path, prepared_digits)
    base = ["--checkpoint", str(export), "--out", str(tmp_path / "x.png"), "--no-progress",
            "--device", "cpu", "--data", str(prepared_digits)]
    cases = [
        (["--index", "0", "--offset", "784"], "--offset 784"),
        (["--index", "0", "--offset", "-1"], "--offset -1"),
        (["--index", "5000", "--offset", "10"], "out of range"),
        (["--index", "0", "--offset", "10", "--classes", "1"], "drop --classes"),
        (["--index", "0"], "needs --offset"),
    ]
    for extra, words in cases:
        assert main(base + extra) == 2, extra
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert words in message, (extra, message)
    wrong = tmp_path / "other.pt"
    config = ModelConfig(bins=16, seq_len=784, n_layers=1, n_heads=1, d_query=4, d_ff=8)
    info = dict(load_manifest(prepared_digits).image_info(), bins=16)
    write_export(wrong, ImageTransformer(config), info=info)
    assert main(base[:0] + ["--checkpoint", str(wrong)] + base[2:] + ["--index", "0", "--offset", "5"]) == 2
    assert "bins=256" in capsys.readouterr().err
