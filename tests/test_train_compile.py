"""train.compile: the compiled blocks (inductor, here on the CPU) give eager's loss and gradients, with
no graph break inside a block; the config key's values. train.kernel_cache: the cache variables."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from model import ImageTransformer, ModelConfig
from train.config import ConfigError, load_config
from train.trainer import KERNEL_CACHE_VARIABLES, compile_blocks, kernel_cache

TINY = dict(bins=16, seq_len=24, n_layers=2, n_heads=2, d_query=8, d_ff=32, attention="causal-linear",
            head="logistic-mixture", mixtures=3, condition="class",
            condition_inject="film", n_classes=4, condition_dropout=0.0)


@pytest.fixture
def one_thread():
    """One torch thread: inductor's CPU code and a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loss_and_grads(net, seqs, labels):
    """The training loss (the model's own nll, as the trainer takes it) and every parameter's gradient."""
    net.zero_grad(set_to_none=True)
    loss = net(seqs, labels, return_nll=True).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


@pytest.mark.slow  # inductor's C++ code generation: ~2 minutes on a busy 2-core machine
def test_compiled_blocks_give_eager_loss_and_gradients(one_thread):
    torch.manual_seed(0)
    eager = ImageTransformer(ModelConfig(**TINY), backend="torch", chunk_size=8).train()
    with torch.no_grad():  # non-zero condition paths, so that FiLM is exercised too
        for block in eager.blocks:
            block.condition_projection.weight.normal_(std=0.1)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, "true", torch.device("cpu"))
    seqs, labels = torch.randint(0, 16, (3, 24)), torch.tensor([0, 1, 3])
    loss, grads = loss_and_grads(eager, seqs, labels)
    compiled_loss, compiled_grads = loss_and_grads(compiled, seqs, labels)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # same parameter names: checkpoints and exports of a compiled run load anywhere
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_blocks_give_eager_loss_and_gradients_on_cuda_with_the_default_backend():
    torch.manual_seed(0)
    config = ModelConfig(**{**TINY, "seq_len": 256, "d_query": 32})
    eager = ImageTransformer(config, backend="auto", chunk_size=64).cuda().train()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, "auto", torch.device("cuda"))
    seqs, labels = torch.randint(0, 16, (4, 256), device="cuda"), torch.tensor([0, 1, 3, 2], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(eager, seqs, labels)
        compiled_loss, compiled_grads = loss_and_grads(compiled, seqs, labels)
    torch.testing.assert_close(compiled_loss, loss, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():  # bf16: fused arithmetic rounds differently
        assert (compiled_grads[name] - grad).norm() <= 0.05 * grad.norm() + 1e-6, name


def test_a_block_compiles_as_one_graph_forward_and_backward(one_thread):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = ImageTransformer(ModelConfig(**TINY), backend="torch", chunk_size=8).blocks[0].train()
    x = torch.randn(2, 24, block.attention_norm.normalized_shape[0], requires_grad=True)
    bias = torch.randn(2, 5 * x.shape[-1])
    explanation = torch._dynamo.explain(block)(x, None, bias)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # fullgraph: a break would raise; aot_eager traces forward and backward as inductor would receive
    # them, without its code generation (that is the slow test above)
    out, _ = torch.compile(block, fullgraph=True, backend="aot_eager")(x, None, bias)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("setting, device, expected", [("auto", "cpu", False), ("auto", "cuda", True),
                                                        ("false", "cuda", False), ("true", "cpu", True)])
def test_compile_setting_resolves_per_device(setting, device, expected, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(self))
    net = ImageTransformer(ModelConfig(**TINY), backend="torch", chunk_size=8)
    assert compile_blocks(net, setting, torch.device(device)) is expected
    assert calls == (list(net.blocks) if expected else [])


def test_compile_key_takes_yaml_booleans_and_refuses_other_values():
    assert load_config(None, ["train.max_steps=1"]).train.compile == "auto"
    assert load_config(None, ["train.max_steps=1", "train.compile=true"]).train.compile == "true"
    assert load_config(None, ["train.max_steps=1", "train.compile=false"]).train.compile == "false"
    with pytest.raises(ConfigError, match="train.compile must be one of auto, true, false, got 'yes'"):
        load_config(None, ["train.max_steps=1", "train.compile=yes"])


@pytest.fixture
def no_cache_variables(monkeypatch):
    """None of the kernel-cache variables set (monkeypatch restores the caller's afterwards)."""
    for name in KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_kernel_cache_goes_under_the_run_folder_for_the_run_only(tmp_path, no_cache_variables):
    with kernel_cache(str(tmp_path / "run"), enabled=True):
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "run" / ".kernel-cache" / "triton")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "run" / ".kernel-cache" / "inductor")
        assert os.environ["TRITON_CACHE_AUTOTUNING"] == "1"
    assert not any(name in os.environ for name in KERNEL_CACHE_VARIABLES)


def test_kernel_cache_leaves_what_the_user_set_and_can_be_turned_off(tmp_path, no_cache_variables, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/shared/triton")
    with kernel_cache(str(tmp_path), enabled=True):
        assert os.environ["TRITON_CACHE_DIR"] == "/shared/triton"
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))
    assert os.environ["TRITON_CACHE_DIR"] == "/shared/triton" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    with kernel_cache(str(tmp_path), enabled=False):
        assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and "TRITON_CACHE_AUTOTUNING" not in os.environ

