"""lit-eval: exact bits/dim over every test image, class agreement with a cached classifier, bad input."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from data_prep.manifest import load_manifest
from data_prep.reader import read_samples
from sample.classifier import CACHE_FOLDER, CACHE_NAME, load_or_train, ClassifierSettings, predict, \
    sequences_to_tensor
from sample.evaluate import main
from model.generation import SamplingOptions, generate_images
from test_sample_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sample_helpers import tiny_model, write_export, write_step_folder

CLASSIFIER_STEPS = 60  # enough to train end to end; its accuracy is not what these tests check


def run_cli(*args) -> int:
    return main([*map(str, args), "--no-progress", "--device", "cpu"])


def digits_model(condition: str = "class", seed: int = 0):
    """A tiny model over the 28x28 digits of small_digits (256 levels, raster)."""
    return tiny_model(seed, bins=256, seq_len=784, n_layers=1, d_ff=16, condition=condition, n_classes=10)


def digits_info(data: Path) -> dict:
    return load_manifest(data).image_info()


@pytest.fixture(scope="module")
def data(small_digits, tmp_path_factory) -> Path:
    """A private copy of small_digits: lit-eval caches its classifier inside the data folder."""
    copy = tmp_path_factory.mktemp("eval") / "digits"
    shutil.copytree(small_digits, copy)
    return copy


@pytest.fixture(scope="module")
def class_export(data, tmp_path_factory) -> Path:
    return write_export(tmp_path_factory.mktemp("eval") / "export", digits_model(), 7, digits_info(data))


def direct_bits_per_dim(net, data: Path, condition: str) -> tuple[float, int]:
    """net.nll over every test image, read by index, in one batch."""
    total = load_manifest(data).splits["test"].total
    batch = read_samples(data, range(total), split="test")
    labels = batch.labels if condition in ("class", "both") else None
    with torch.no_grad():
        nll = net.nll(batch.seqs.long(), labels=labels)  # (N, L)
    return nll.double().sum().item() / nll.numel() / math.log(2), total


@pytest.mark.parametrize("form", ["export", "step folder", "run folder"])
def test_bits_per_dim_equals_nll_over_every_test_image(data, tmp_path, form, capsys):
    net = digits_model(seed=3)
    if form == "export":
        checkpoint = write_export(tmp_path / "export", net, 5, digits_info(data))
    elif form == "step folder":
        checkpoint = write_step_folder(tmp_path / "step_0000005", net, 5, digits_info(data))
    else:
        checkpoint = tmp_path / "run"
        write_step_folder(checkpoint / "checkpoints" / "step_0000005", net, 5, digits_info(data))
    out = tmp_path / "eval.json"
    # batch 24 does not divide 64 test images: the last batch is partial and must count too
    assert run_cli("--checkpoint", checkpoint, "--data", data, "--n-per-class", 0, "--batch-size", 24,
                   "--json", out) == 0
    result = json.loads(out.read_text())
    expected, images = direct_bits_per_dim(net, data, "class")
    assert result["images"] == images == 64 and result["bytes"] == 64 * 784
    assert result["bits_per_dim"] == pytest.approx(expected, rel=1e-6)
    assert result["step"] == 5 and result["agreement"] is None
    printed = capsys.readouterr().out
    assert f"bits/dim         {expected:.4f}" in printed and "--n-per-class 0" in printed


def test_unconditional_model_has_no_agreement(data, tmp_path, capsys):
    net = digits_model("none")
    export = write_export(tmp_path / "export", net, 1, digits_info(data))
    out = tmp_path / "eval.json"
    assert run_cli("--checkpoint", export, "--data", data, "--n-per-class", 2, "--json", out) == 0
    result = json.loads(out.read_text())
    assert result["agreement"] is None and result["condition"] == "none"
    assert result["bits_per_dim"] == pytest.approx(direct_bits_per_dim(net, data, "none")[0], rel=1e-6)
    assert "not class-conditional" in capsys.readouterr().out
    assert not (data / CACHE_FOLDER).exists()  # no classifier trained for nothing


def test_class_agreement_per_class_with_a_cached_classifier(data, class_export, tmp_path, capsys):
    cache = data / CACHE_FOLDER / CACHE_NAME
    args = ("--checkpoint", class_export, "--data", data, "--n-per-class", 2, "--seed", 4,
            "--classifier-steps", CLASSIFIER_STEPS)
    assert run_cli(*args, "--json", tmp_path / "first.json") == 0
    first_out = capsys.readouterr().out
    assert "classifier: training" in first_out and cache.is_file()
    first = json.loads((tmp_path / "first.json").read_text())
    agreement = first["agreement"]
    assert agreement["n_per_class"] == 2 and len(agreement["per_class"]) == 10
    assert all(0.0 <= share <= 1.0 for share in agreement["per_class"]) and 0.0 <= agreement["overall"] <= 1.0
    assert [sum(row) for row in agreement["confusion"]] == [2] * 10
    assert agreement["per_class"] == [agreement["confusion"][c][c] / 2 for c in range(10)]
    assert 0.0 <= agreement["classifier"]["test_accuracy"] <= 1.0
    assert agreement["classifier"]["test_images"] == 64 and agreement["classifier"]["trained_now"]
    assert f"classifier test accuracy {agreement['classifier']['test_accuracy']:.1%}" in first_out

    # the score is the cached classifier's verdict on the sampler's own images for this seed
    classifier, _, _, trained = load_or_train(data, ClassifierSettings(steps=CLASSIFIER_STEPS), log=lambda _: None)
    assert not trained
    net = digits_model()
    labels = torch.arange(10).repeat_interleave(2)
    seqs, _ = generate_images(net, 20, SamplingOptions(seed=4, progress=False), labels=labels)
    predicted = predict(classifier, sequences_to_tensor(seqs, load_manifest(data)))
    assert agreement["overall"] == pytest.approx((predicted == labels).double().mean().item())

    # second run: the cache is used, not rebuilt, and gives the same numbers
    written = cache.stat().st_mtime_ns
    assert run_cli(*args, "--json", tmp_path / "second.json") == 0
    assert "classifier: cached" in capsys.readouterr().out
    assert cache.stat().st_mtime_ns == written
    second = json.loads((tmp_path / "second.json").read_text())["agreement"]
    assert second["overall"] == agreement["overall"] and not second["classifier"]["trained_now"]


def test_changed_manifest_retrains_the_classifier(data, class_export, tmp_path, capsys):
    copy = tmp_path / "digits"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    args = ("--checkpoint", class_export, "--data", copy, "--n-per-class", 1,
            "--classifier-steps", CLASSIFIER_STEPS, "--classifier-dir", tmp_path / "cache")
    assert run_cli(*args) == 0
    assert "classifier: training" in capsys.readouterr().out
    manifest = copy / "manifest.json"
    manifest.write_text(manifest.read_text() + "\n")  # same content for the reader, a different file
    assert run_cli(*args) == 0
    assert "the data's manifest changed" in capsys.readouterr().out
    assert (tmp_path / "cache" / CACHE_NAME).is_file() and not (copy / CACHE_FOLDER).exists()


def test_help_explains_the_tool(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("--n-per-class", "--json", "bits/dim", "classifier", "accelerate launch"):
        assert words in text


@pytest.mark.parametrize("case, code, named", [
    ("no checkpoint", 2, "nowhere"),
    ("not prepared", 2, "manifest.json"),
    ("no such split", 2, "--split"),
    ("other images", 2, "--data"),
    ("corrupt export", 1, "broken"),
    ("negative n", 2, "--n-per-class"),
    ("zero classifier steps", 2, "--classifier-steps"),
    ("json folder missing", 2, "--json"),
    ("negative guidance", 2, "--guidance"),
])
def test_bad_input_is_one_line(data, class_export, tmp_path, capsys, case, code, named):
    checkpoint, folder, extra = class_export, data, []
    if case == "no checkpoint":
        checkpoint = tmp_path / "nowhere"
    elif case == "not prepared":
        folder = tmp_path
    elif case == "no such split":
        extra = ["--split", "validation"]
    elif case == "other images":
        checkpoint = write_export(tmp_path / "small", tiny_model())  # 6x6 images, 16 levels
    elif case == "corrupt export":
        checkpoint = write_export(tmp_path / "broken", tiny_model())
        (checkpoint / "model.safetensors").write_bytes((class_export / "model.safetensors").read_bytes()[:300])
    elif case == "negative n":
        extra = ["--n-per-class", "-1"]
    elif case == "json folder missing":
        extra = ["--json", tmp_path / "nowhere" / "eval.json"]
    elif case == "negative guidance":
        extra = ["--guidance", "-1"]
    else:
        extra = ["--classifier-steps", "0"]
    assert run_cli("--checkpoint", checkpoint, "--data", folder, *extra) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], captured.err
    assert captured.out == ""


def test_a_failed_json_write_keeps_the_earlier_results(data, tmp_path, capsys, monkeypatch):
    import resource
    import signal

    import sample.evaluate as evaluate

    export = write_export(tmp_path / "export", digits_model("none"), 1, digits_info(data))
    out = tmp_path / "eval.json"
    out.write_text('{"earlier": "results"}\n')
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no signal
    table = evaluate.format_table

    def table_then_a_small_file_limit(result):  # the JSON is written next: make it fail as a full disk would
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, limit[1]))
        return table(result)

    monkeypatch.setattr(evaluate, "format_table", table_then_a_small_file_limit)
    try:
        code = run_cli("--checkpoint", export, "--data", data, "--n-per-class", 2, "--json", out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 1 and "--json" in capsys.readouterr().err
    assert out.read_text() == '{"earlier": "results"}\n'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".eval")] == []  # no temporary left
