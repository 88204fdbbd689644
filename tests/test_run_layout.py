"""common.run_layout: the one place that knows the run folder; the trainer and the sampler both follow it."""

import json
import os

import pytest
import torch

import common.run_layout as layout
from sample.errors import SampleFailure, SampleUsageError
from sample.loading import load_for_sampling
from test_sample_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sample_helpers import image_info, tiny_model, write_export, write_step_folder
from train.checkpoint import (damaged_folders, prune_checkpoints, remove_stale_temporaries, resolve_resume,
                              save_checkpoint)


def test_step_pattern_names_and_folders():
    assert layout.checkpoint_name(500) == "step_0000500" and layout.checkpoint_name(12345678) == "step_12345678"
    for name in ("step_0000500", "step_12345678"):
        assert layout.STEP_FOLDER.match(name)
    for name in ("step_500", "step_0000500.tmp-ab12", "step_0000500.damaged-ab12", "export", "step_x"):
        assert not layout.STEP_FOLDER.match(name)
    assert layout.export_folder("RUN") == os.path.join("RUN", "export")
    assert layout.checkpoint_model("C") == os.path.join("C", "model")


@pytest.fixture
def run(tmp_path):
    """A run folder: complete checkpoints 100 and 200, an incomplete 300, a short name, temporaries."""
    run = tmp_path / "run"
    write_step_folder(run / "checkpoints" / "step_0000100", tiny_model(seed=1), 100)
    write_step_folder(run / "checkpoints" / "step_0000200", tiny_model(seed=2), 200)
    (run / "checkpoints" / "step_0000300" / "model").mkdir(parents=True)  # a crash before meta.json
    write_step_folder(run / "checkpoints" / "step_400", tiny_model(seed=4), 400)  # not the pattern
    (run / "checkpoints" / "step_0000500.tmp-abcd").mkdir()
    (run / "checkpoints" / "step_0000050.damaged-abcd").mkdir()
    (run / "export.tmp-abcd").mkdir()
    return run


def test_trainer_and_sampler_see_the_same_complete_checkpoints(run):
    assert [step for step, _ in layout.complete_checkpoints(run)] == [100, 200]
    newest = str(run / "checkpoints" / "step_0000200")
    assert resolve_resume(str(run), "auto") == newest  # the trainer resumes it
    loaded = load_for_sampling(run)  # the sampler draws from it (no export yet)
    assert loaded.step == 200 and loaded.source == run / "checkpoints" / "step_0000200" / "model"
    assert layout.model_folder(run) == layout.checkpoint_model(newest)
    with pytest.raises(SampleFailure, match="incomplete checkpoint"):
        load_for_sampling(run / "checkpoints" / "step_0000300")
    assert damaged_folders(str(run)) == ["step_0000050.damaged-abcd"]
    assert remove_stale_temporaries(str(run)) == ["export.tmp-abcd", "step_0000500.tmp-abcd"]
    prune_checkpoints(str(run), keep=1)
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000050.damaged-abcd", "step_0000200",
                                                       "step_0000300", "step_400"]


def test_completeness_is_decided_in_the_layout_alone(run, monkeypatch):
    """Changing the layout's completeness marker changes what both the trainer and the sampler see."""
    monkeypatch.setattr(layout, "META_NAME", "done.json")
    (run / "checkpoints" / "step_0000100" / "done.json").write_text(json.dumps({"step": 100}))
    assert [step for step, _ in layout.complete_checkpoints(run)] == [100]
    assert resolve_resume(str(run), "auto") == str(run / "checkpoints" / "step_0000100")
    assert load_for_sampling(run).step == 100
    monkeypatch.setattr(layout, "STEP_FOLDER", layout.re.compile(r"^step_(\d+)$"))
    (run / "checkpoints" / "step_400" / "done.json").write_text(json.dumps({"step": 400}))
    assert resolve_resume(str(run), "auto") == str(run / "checkpoints" / "step_400")
    assert load_for_sampling(run).step == 400


def test_a_run_folder_means_its_export_when_at_least_as_new(run):
    write_export(run / "export", tiny_model(seed=9), step=150)
    assert load_for_sampling(run).step == 200  # the checkpoint is newer
    write_export(run / "export", tiny_model(seed=9), step=200)
    assert layout.model_folder(run) == str(run / "export")
    with pytest.raises(SampleUsageError, match="no such file or folder"):
        load_for_sampling(run / "absent")


def test_a_checkpoint_of_an_earlier_version_says_how_to_get_a_model_folder(run):
    # checkpoints written before the model folder existed hold only accelerate's files and meta.json
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_0000200" / "model")
    for path in (run / "checkpoints" / "step_0000200", run):
        with pytest.raises(SampleFailure, match="earlier version .*resume its run once"):
            load_for_sampling(path)


def test_a_replaced_export_left_by_a_crash_is_put_back(tmp_path):
    run = tmp_path / "run"
    write_export(run / "export.replaced-abcd", tiny_model(), step=7)  # a crash between the two renames
    assert remove_stale_temporaries(str(run)) == []
    assert load_for_sampling(run).step == 7


def test_every_checkpoint_holds_the_given_model_folder(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    net = tiny_model(seed=5)
    try:
        accelerator = Accelerator(cpu=True)
        accelerator.prepare(tiny_model(seed=6))  # the state being trained
        meta = {"model_config": {}, "image": image_info(net.config)}
        folder = save_checkpoint(accelerator, str(tmp_path), 3, meta, keep=2, model=net)
    finally:
        AcceleratorState._reset_state(True)  # accelerate's state is a process-wide singleton
    recorded = json.loads(open(os.path.join(folder, "meta.json")).read())["files"]
    assert {"model/model.safetensors", "model/config.json", "model.safetensors"} <= set(recorded)
    loaded = load_for_sampling(folder)
    assert loaded.step == 3
    assert all(torch.equal(value, net.state_dict()[key]) for key, value in loaded.net.state_dict().items())
