"""verify: a good folder passes; a flipped byte, a truncated tar or a missing shard is named."""

import shutil
import subprocess
import sys

import pytest

from data_prep.manifest import load_manifest
from data_prep.verify import main, verify


@pytest.fixture
def copy_of_digits(prepared_digits, tmp_path):
    target = tmp_path / "digits"
    shutil.copytree(prepared_digits, target)
    return target


def test_a_prepared_folder_verifies(prepared_digits, capsys):
    assert verify(prepared_digits) == []
    assert main([str(prepared_digits)]) == 0
    assert "OK" in capsys.readouterr().out


def test_a_flipped_byte_is_found_and_the_shard_named(copy_of_digits, capsys):
    shard = copy_of_digits / "train-000005.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # somewhere inside the samples
    shard.write_bytes(bytes(data))
    problems = verify(copy_of_digits)
    assert problems and all("train-000005.tar" in p for p in problems)
    assert main([str(copy_of_digits)]) == 1
    assert "train-000005.tar" in capsys.readouterr().err


def test_a_value_outside_bins_is_found(tmp_path, tiny_mnist_root):
    from data_prep.prepare import PrepareConfig, prepare

    out = tmp_path / "o"
    prepare(PrepareConfig(dataset="mnist", root=str(tiny_mnist_root), out=str(out), bins=4, progress=False))
    shard = out / "test-000000.tar"
    data = bytearray(shard.read_bytes())
    data[1024 + 600] = 200  # a sequence byte of the second member (cls, seq.bin, txt per sample)
    shard.write_bytes(bytes(data))
    assert any("test-000000.tar" in p and "bins is 4" in p for p in verify(out))


def test_a_truncated_tar_is_found(copy_of_digits):
    shard = copy_of_digits / "test-000003.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    problems = verify(copy_of_digits)
    assert problems and all("test-000003.tar" in p for p in problems)
    assert any("samples, manifest says" in p or "unreadable" in p for p in problems)


def test_a_missing_shard_is_named(copy_of_digits):
    (copy_of_digits / "train-000015.tar").unlink()
    assert verify(copy_of_digits) == [f"{copy_of_digits / 'train-000015.tar'}: missing"]


def test_not_a_prepared_folder_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "preparation did not finish" in capsys.readouterr().err


def test_cli_exit_code_names_the_shard(copy_of_digits):
    shard = copy_of_digits / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-2048])
    done = subprocess.run([sys.executable, "-m", "data_prep.verify", str(copy_of_digits)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "train-000000.tar" in done.stderr
    assert load_manifest(copy_of_digits).dataset == "digits"
