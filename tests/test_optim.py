"""The optimizer: fused AdamW where torch has the kernel, with the same updates as the default one."""

import torch

from prefkit.loops.optim import adamw, build_optimizer, fused_supported
from prefkit.models.tiny import build_tiny_model
from prefkit.recipe import TrainConfig


def train_steps(fused: bool, steps: int = 4) -> dict[str, torch.Tensor]:
    model = build_tiny_model(vocab_size=64, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 12), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_build_optimizer_fuses_adamw_on_cpu():
    model = build_tiny_model(vocab_size=64)
    optimizer, _ = build_optimizer(model, TrainConfig(), total_steps=10)
    assert fused_supported(list(model.parameters()))  # torch >= 2.4 has a CPU kernel
    assert optimizer.param_groups[0]["fused"] is True


def test_fused_adamw_updates_equal_the_default_ones():
    fused, default = train_steps(fused=True), train_steps(fused=False)
    for name, value in default.items():
        torch.testing.assert_close(fused[name], value, rtol=0, atol=1e-6, msg=name)
    moved = max((fused[name] - value).abs().max().item() for name, value in train_steps(fused=False, steps=0).items())
    assert moved > 1e-3  # the steps did change the weights


def test_no_fused_kernel_falls_back_to_the_default_adamw():
    param = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))  # torch has no fused kernel for complex
    assert not fused_supported([param])
    optimizer = adamw([param], lr=0.1)
    assert not optimizer.param_groups[0]["fused"]
    param.grad = torch.ones_like(param)
    optimizer.step()  # would raise with fused=True
