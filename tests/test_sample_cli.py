"""The sampler CLI: grid geometry, class and caption paths, checkpoint forms, and each bad input."""

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import grids
from sample.loading import load_for_sampling
from sample.run import main
from test_sample_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sample_helpers import tiny_model, write_export, write_step_folder


def run_cli(*args) -> int:
    return main([*map(str, args), "--no-progress", "--device", "cpu"])


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size  # (width, height)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return write_export(tmp_path_factory.mktemp("run") / "export", tiny_model())


@pytest.mark.parametrize("images, columns, padding", [(16, 4, 2), (7, 3, 2), (10, 10, 0), (5, 8, 3)])
def test_grid_size_matches_rows_columns_image_size_and_padding(tmp_path, images, columns, padding):
    pictures = np.random.default_rng(0).integers(0, 256, (images, 5, 7, 1), dtype=np.uint8)
    height, width = grids.save_grid(pictures, tmp_path / "g.png", columns, padding)
    used = min(columns, images)
    rows = -(-images // used)
    assert (height, width) == (rows * (5 + padding) + padding, used * (7 + padding) + padding)
    assert png_size(tmp_path / "g.png") == (width, height)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    # the first image sits right after the padding, unchanged (grey shown as equal RGB channels)
    assert np.array_equal(grid[padding:padding + 5, padding:padding + 7, 0], pictures[0, :, :, 0])
    assert list(tmp_path.iterdir()) == [tmp_path / "g.png"]  # no temporary file left behind


def test_class_grid_has_one_row_per_class(tmp_path, export, capsys):
    out = tmp_path / "classes.png"
    assert run_cli("--checkpoint", export, "--out", out, "--classes", "0,2", "--n", 3,
                   "--per-image", "--npz") == 0
    assert png_size(out) == (3 * 8 + 2, 2 * 8 + 2)  # 6x6 images, padding 2
    saved = np.load(tmp_path / "classes.npz")
    assert saved["sequences"].shape == (6, 36) and saved["sequences"].dtype == np.uint8
    assert saved["labels"].tolist() == [0, 0, 0, 2, 2, 2]
    assert sorted(p.name for p in (tmp_path / "classes").iterdir())[0] == "class0_000.png"
    assert len(list((tmp_path / "classes").iterdir())) == 6
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "images/s" in last and "bytes/s" in last


def test_printed_speed_leaves_out_the_warm_up_and_reports_it(tmp_path, export, capsys, monkeypatch):
    from model.transformer import ImageTransformer

    prefill, pause = ImageTransformer.prefill, 1.0

    def slow_first_prefill(self, *args, **kwargs):  # a GPU's one-off costs: compilation, autotuning
        if not hasattr(slow_first_prefill, "done"):
            slow_first_prefill.done = True
            time.sleep(pause)
        return prefill(self, *args, **kwargs)

    monkeypatch.setattr(ImageTransformer, "prefill", slow_first_prefill)
    # two batches of 4: the second batch size is one seen before, so all of it is steady
    assert run_cli("--checkpoint", export, "--out", tmp_path / "g.png", "--n", 8, "--batch-size", 4) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    found = re.fullmatch(r"8 images, 288 bytes in ([0-9.]+) s = warm-up ([0-9.]+) s \(compilation, autotuning, "
                         r"graph capture, first bytes\) \+ ([0-9.]+) s at ([0-9.]+) images/s, ([0-9,]+) bytes/s "
                         r"\(recurrent, cpu, batch 4, (fp32|bf16)\)", last)
    assert found, last
    total, warm_up, steady, rate = (float(found.group(i)) for i in range(1, 5))
    assert warm_up >= pause and abs(total - warm_up - steady) < 0.02 and steady < pause
    # the printed steady time is rounded to 0.01 s: the rate must lie within what that rounding allows
    assert 8 / (steady + 0.005) * 0.99 <= rate <= 8 / max(steady - 0.005, 1e-3) * 1.01 and rate > 8 / pause


def test_class_names_and_captions_condition_the_model(tmp_path, export):
    out = tmp_path / "c.png"
    assert run_cli("--checkpoint", export, "--out", out, "--classes", "c1", "--n", 2, "--npz",
                   "--caption", "hello") == 0
    saved = np.load(tmp_path / "c.npz")
    assert saved["labels"].tolist() == [1, 1] and saved["captions"].tolist() == ["hello", "hello"]
    assert run_cli("--checkpoint", export, "--out", out, "--caption", "one", "--caption", "two",
                   "--n", 4, "--npz") == 0
    saved = np.load(tmp_path / "c.npz")
    assert saved["captions"].tolist() == ["one"] * 4 + ["two"] * 4
    assert saved["labels"].tolist() == [-1] * 8
    assert png_size(out) == (4 * 8 + 2, 2 * 8 + 2)
    # the caption reaches the model: a different caption gives different images for the same seed
    assert run_cli("--checkpoint", export, "--out", out, "--caption", "three", "--n", 4, "--npz") == 0
    assert not np.array_equal(np.load(tmp_path / "c.npz")["sequences"], saved["sequences"][4:])


def test_unconditional_defaults_to_a_square_grid_and_the_seed_reproduces(tmp_path, export):
    assert run_cli("--checkpoint", export, "--out", tmp_path / "a.png", "--npz", "--seed", 4) == 0
    assert png_size(tmp_path / "a.png") == (4 * 8 + 2, 4 * 8 + 2)  # 16 images
    assert run_cli("--checkpoint", export, "--out", tmp_path / "b.png", "--npz", "--seed", 4,
                   "--batch-size", 5, "--mode", "parallel") == 0
    first, second = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(first["sequences"], second["sequences"])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_compile_flag_reaches_the_sampler_and_draws_the_same_images(tmp_path, export, monkeypatch):
    import model.generation as generation

    compiled_calls = []
    # "aot_eager": dynamo's trace of the step, without generating C++/Triton code (~25 s on this CPU)
    traced = torch.compile(generation._recurrent_step, backend="aot_eager", dynamic=False)
    monkeypatch.setattr(generation, "_compiled_step", lambda: compiled_calls.append(1) or traced)
    assert run_cli("--checkpoint", export, "--out", tmp_path / "c.png", "--npz", "--seed", 4, "--n", 4,
                   "--compile", "--no-cuda-graph") == 0
    assert compiled_calls  # every step went through the compiled function
    steps = len(compiled_calls)
    assert run_cli("--checkpoint", export, "--out", tmp_path / "e.png", "--npz", "--seed", 4, "--n", 4) == 0
    assert len(compiled_calls) == steps  # without --compile it is never used
    compiled, eager = np.load(tmp_path / "c.npz"), np.load(tmp_path / "e.npz")
    assert np.array_equal(compiled["sequences"], eager["sequences"])


def test_guidance_flag_guides_and_one_changes_nothing(tmp_path):
    net = tiny_model()
    with torch.no_grad():  # a class that matters: random 0.02-scale embeddings barely move the logits
        net.condition.class_embedding.weight.normal_(0.0, 1.0)
    export = write_export(tmp_path / "export", net)
    for name, extra in (("plain", ()), ("one", ("--guidance", "1")), ("three", ("--guidance", "3"))):
        assert run_cli("--checkpoint", export, "--out", tmp_path / f"{name}.png", "--npz", "--seed", 2,
                       "--classes", "0-2", "--n", "2", *extra) == 0
    plain, one, three = (np.load(tmp_path / f"{name}.npz")["sequences"] for name in ("plain", "one", "three"))
    assert np.array_equal(plain, one) and not np.array_equal(plain, three)


def test_loads_export_step_folder_and_run_folder(tmp_path):
    old, new = tiny_model(seed=1), tiny_model(seed=2)
    run = tmp_path / "run"
    write_export(run / "export", old, step=100)
    write_step_folder(run / "checkpoints" / "step_0000200", new, step=200)
    write_step_folder(run / "checkpoints" / "step_0000050", old, step=50)
    # an interrupted save: newest by name, but no meta.json, so never taken
    (run / "checkpoints" / "step_0000300.tmp-abcd").mkdir()

    def same_weights(loaded, net):
        mine = loaded.net.state_dict()
        return all(torch.equal(mine[key], value) for key, value in net.state_dict().items())

    from_export = load_for_sampling(run / "export")
    assert from_export.step == 100 and same_weights(from_export, old)
    from_folder = load_for_sampling(run / "checkpoints" / "step_0000200")
    assert from_folder.step == 200 and same_weights(from_folder, new)
    assert from_folder.image["height"] == 6
    from_run = load_for_sampling(run)  # the checkpoint (200) is newer than the export (100)
    assert from_run.step == 200 and same_weights(from_run, new)
    write_export(run / "export", old, step=200)  # an export at the same step wins
    assert load_for_sampling(run).source == run / "export"
    assert from_folder.source == run / "checkpoints" / "step_0000200" / "model"
    assert run_cli("--checkpoint", run, "--out", tmp_path / "r.png") == 0


def test_a_checkpoint_folder_samples_its_model_folder_and_never_reads_accelerates_files(tmp_path):
    """What the trainer writes beside model/ (accelerate's save_state: safetensors, pickles) is not read."""
    folder = write_step_folder(tmp_path / "step_0000007", tiny_model(seed=3), 7)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "ema.safetensors"):
        (folder / name).write_bytes(b"not read by the sampler")
    loaded = load_for_sampling(folder)
    assert loaded.step == 7 and loaded.source == folder / "model"
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in tiny_model(seed=3).state_dict().items())
    assert run_cli("--checkpoint", folder, "--out", tmp_path / "s.png", "--n", 2) == 0


def bad(capsys, *args) -> tuple[int, str]:
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    return code, err.splitlines()[-1] if err else ""


def test_bad_inputs_give_one_line_errors(tmp_path, export, capsys):
    out = tmp_path / "x.png"
    unconditional = write_export(tmp_path / "plain", tiny_model(condition="none"))
    corrupt = write_export(tmp_path / "corrupt", tiny_model())
    (corrupt / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes()[:500])
    incomplete = tmp_path / "run" / "checkpoints" / "step_0000010"
    incomplete.mkdir(parents=True)
    broken = write_step_folder(tmp_path / "broken" / "step_0000005", tiny_model(), 5)
    (broken / "model" / "config.json").write_text("{")
    old = tmp_path / "old" / "export" / "model.pt"
    old.parent.mkdir(parents=True)
    torch.save({"format": 1}, old)
    cases = [
        ((tmp_path / "missing",), 2, "no such file"),
        ((corrupt,), 1, "model.safetensors is corrupt"),
        ((incomplete,), 1, "incomplete checkpoint"),
        ((tmp_path / "run",), 2, "not a model folder"),
        ((broken,), 1, "config.json: unreadable"),
        ((old,), 1, "no longer read"),
        ((old.parent.parent,), 1, "no longer read"),
        ((export, "--classes", "0-3"), 2, "class 3 is outside"),
        ((export, "--classes", "seven"), 2, "not an integer"),
        ((export, "--caption", "x" * 17), 2, "at most 16"),
        ((unconditional, "--classes", "0"), 2, "not class-conditional"),
        ((unconditional, "--caption", "a"), 2, "not caption-conditional"),
        ((export, "--index", "0-3", "--offset", "4"), 2, "needs --data"),
        ((export, "--offset", "4"), 2, "give --index"),
        ((export, "--temperature", "-1"), 2, "--temperature"),
        ((export, "--top-p", "1.5"), 2, "--top-p"),
        ((export, "--n", "0"), 2, "--n 0"),
        ((export, "--guidance", "-2"), 2, "--guidance -2"),
        ((unconditional, "--guidance", "3"), 2, "the model is unconditional"),
    ]
    for extra, code, words in cases:
        got_code, message = bad(capsys, "--checkpoint", extra[0], "--out", out, *extra[1:])
        assert (got_code, words in message) == (code, True), (extra, message)
        assert message.startswith("lit-sample: ")
    assert not out.exists()
    with pytest.raises(SystemExit) as usage:
        main(["--checkpoint", str(export), "--out", str(out), "--mode", "sideways"])
    assert usage.value.code == 2
    capsys.readouterr()
    assert bad(capsys, "--checkpoint", export, "--out", tmp_path / "x.jpg")[0] == 2
