"""The compiled training step (`compile: true`, the default on GPUs) takes the step the eager one takes, and leaves
the checkpoint's keys as they were."""
import pytest
import torch
from helpers import tiny_train_config
from safetensors.torch import load_file

from ldm.train.loop import train
from ldm.train.model import build_parts

PREFIX = "denoiser.network."  # the U-Net's keys inside the trainer's checkpoint


@pytest.mark.slow
def test_the_compiled_training_step_equals_the_eager_one(shape_shards, tmp_path, monkeypatch):
    compiled = []
    original = torch.nn.Module.compile

    def compile_traced(self, *args, **kwargs):  # AOT autograd's forward and backward graphs, run without inductor
        compiled.append(type(self).__name__)  # (inductor's CPU code generation takes minutes on a small machine)
        return original(self, backend="aot_eager", dynamic=False)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_traced)
    # AdamW's first step with eps >> |g| is lr * g / eps: with lr = eps the parameter change is the gradient.
    common = ["max_steps=1", "data.caption_dropout=0.0", "data.batch_size=2", "optim.lr=1000.0", "optim.eps=1000.0",
              "optim.warmup_steps=0", "optim.max_grad_norm=null"]
    config = tiny_train_config(shape_shards, tmp_path / "eager", *common)
    train(config)
    assert compiled == []  # the default compiles on GPUs only
    train(tiny_train_config(shape_shards, tmp_path / "compiled", *common, "compile=true"))
    assert compiled == ["UNetModel"]

    step = ("checkpoints", "step-000001", "model.safetensors")
    eager, fast = load_file(tmp_path.joinpath("eager", *step)), load_file(tmp_path.joinpath("compiled", *step))
    assert list(fast) == list(eager)  # no `_orig_mod.` prefixes: the network was compiled in place
    torch.manual_seed(config.seed)
    initial = build_parts(config.model).unet.state_dict()
    grads = {k: eager[k] - initial[k[len(PREFIX):]] for k in eager if k.startswith(PREFIX)}
    fast_grads = {k: fast[k] - initial[k[len(PREFIX):]] for k in grads}
    scale = max(g.abs().max().item() for g in grads.values())
    assert scale > 1e-4  # the step moved the weights
    worst = max((fast_grads[k] - grads[k]).abs().max().item() for k in grads)
    assert worst <= 1e-4 * scale, f"the compiled step's gradient differs from the eager one's by {worst} ({scale})"
