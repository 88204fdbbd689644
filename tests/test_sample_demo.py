"""The demo's plan: which stages run, with which command lines, on a fresh and on a finished folder."""

import shutil

from data_prep.manifest import load_manifest
from sample import demo
from test_sample_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sample_helpers import tiny_model, write_export


def plan(out_dir, *flags):
    args = demo.build_parser().parse_args(["--out-dir", str(out_dir), *flags])
    return {name: command for name, command in demo.stages(args, out_dir)}


def test_fresh_folder_runs_prepare_train_and_sample(tmp_path):
    stages = plan(tmp_path, "--max-steps", "7")
    assert list(stages) == ["prepare", "train", "sample"]
    assert stages["prepare"][1:5] == ["-m", "data_prep.prepare", "--dataset", "digits"]
    train = " ".join(stages["train"])
    assert "train/run.py --config" in train and "--resume auto" in train
    assert f"data.dir={tmp_path / 'data' / 'digits'}" in train and "train.max_steps=7" in train
    sample = stages["sample"]
    assert sample[sample.index("--classes") + 1] == "0-9"
    assert sample[sample.index("--checkpoint") + 1] == str(tmp_path / "run")
    assert sample[sample.index("--guidance") + 1] == "2.0"  # the measured sweet spot (bench/RESULTS.md)
    unguided = plan(tmp_path, "--guidance", "1")["sample"]
    assert unguided[unguided.index("--guidance") + 1] == "1.0"


def test_rerun_skips_what_is_done(tmp_path, prepared_digits):
    shutil.copytree(prepared_digits, tmp_path / "data" / "digits")
    bins = str(load_manifest(prepared_digits).bins)
    assert list(plan(tmp_path, "--bins", bins, "--max-steps", "5")) == ["train", "sample"]
    write_export(tmp_path / "run" / "export", tiny_model(), step=5)
    assert list(plan(tmp_path, "--bins", bins, "--max-steps", "5")) == ["sample"]
    assert list(plan(tmp_path, "--bins", bins, "--max-steps", "6")) == ["train", "sample"]  # resumes to 6


def test_digits_at_other_levels_are_prepared_again(tmp_path, prepared_digits):
    shutil.copytree(prepared_digits, tmp_path / "data" / "digits")
    other = str(load_manifest(prepared_digits).bins // 2)
    prepare = plan(tmp_path, "--bins", other)["prepare"]
    assert prepare[prepare.index("--bins") + 1] == other and "--overwrite" in prepare


def test_skip_prepare_needs_a_prepared_folder(tmp_path, capsys):
    assert demo.main(["--out-dir", str(tmp_path), "--skip-prepare"]) == 2
    assert "not a prepared digits folder" in capsys.readouterr().err
