"""benchmarks/profile_cpu.py: every profiled operator lands in the category of its scope or name,
and the scopes it labels for the profiler are put back afterwards."""

from __future__ import annotations

from types import SimpleNamespace

import profile_cpu as pc
import torch

from ibmd_pipeline.engine.ema import EMA


def event(name: str, parent: SimpleNamespace | None = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, cpu_parent=parent)


def test_an_operator_counts_for_its_scope_first_then_for_its_name():
    adamw = event("Optimizer.step#AdamW.step", event("ProfilerStep"))
    ema = event("ema.update")
    assert pc.category(event("aten::add_", adamw)) == "optimizer (AdamW)"
    assert pc.category(event("aten::mul_", event("aten::_foreach_mul_", adamw))) == "optimizer (AdamW)"
    assert pc.category(event("aten::lerp_", ema)) == "EMA"
    assert (
        pc.category(event("aten::linalg_vector_norm", event("grad_norm_clip"))) == "gradient norm, clipping"
    )
    assert pc.category(event("aten::mkldnn_convolution")) == "convolution"
    assert pc.category(event("aten::convolution_backward")) == "convolution"
    assert pc.category(event("aten::_scaled_dot_product_flash_attention_for_cpu")) == "attention"
    assert pc.category(event("aten::native_group_norm_backward")) == "normalisation"
    assert pc.category(event("aten::copy_")) == "data movement, allocation"
    assert pc.category(event("aten::silu")) == pc.OTHER


def test_a_profiled_step_is_split_into_optimizer_ema_and_convolution_and_the_scopes_are_restored():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.SiLU())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ema = EMA(net, decay=0.9)
    x = torch.randn(2, 1, 8, 8)

    def step() -> None:
        loss = net(x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grads_with_norm_(
            list(net.parameters()), 1.0, torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
        )
        optimizer.step()
        ema.update(net)

    originals = (EMA.update, torch.nn.utils.get_total_norm, torch.nn.utils.clip_grads_with_norm_)
    seconds, wall, first = pc.profile_steps(step, steps=1)
    for label in ("optimizer (AdamW)", "EMA", "gradient norm, clipping", "convolution"):
        assert seconds.get(label, 0.0) > 0.0, label
    assert set(seconds) <= set(pc.CATEGORIES)
    assert wall > 0.0 and first > 0.0
    assert (EMA.update, torch.nn.utils.get_total_norm, torch.nn.utils.clip_grads_with_norm_) == originals
