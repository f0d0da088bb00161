"""The optimizer: megatron's Adam with decoupled weight decay, clipping and the gradient norm over the parallel
groups, the warmup + cosine learning rate, and torch's fused and multi-tensor ops where megatron, without
Transformer Engine or apex, falls back to per-tensor Python loops."""
from __future__ import annotations

import math

import torch

from cogvx_mega.config.schema import Config


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, lr: float, min_lr: float) -> float:
    """LR at `step` (0-based): linear warmup to lr, then cosine decay to min_lr at total_steps."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(ddp_chunks: list, config: Config):
    """megatron's optimizer (Adam with decoupled weight decay; no decay on biases and norms).

    It clips and reports the gradient norm across the model-parallel groups, so sharded and
    replicated parameters are counted exactly once at any layout.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = config.training
    bf16_params = t.precision() == "bf16_params"  # fp32 master weights of the bf16 parameters in the optimizer
    optimizer_config = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                                       adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                                       clip_grad=t.grad_clip, bf16=bf16_params, fp16=False,
                                       params_dtype=torch.bfloat16 if bf16_params else torch.float32,
                                       use_distributed_optimizer=config.parallel.use_distributed_optimizer,
                                       overlap_param_gather=config.parallel.overlap_param_gather)
    use_foreach_fallbacks()
    optimizer = get_megatron_optimizer(optimizer_config, ddp_chunks)
    use_fused_cpu_adam(optimizer)
    return optimizer


def use_fused_cpu_adam(optimizer) -> None:
    """torch's fused AdamW (one pass over each tensor, no temporaries) for the parameters on the CPU, where
    megatron, without Transformer Engine or apex, falls back to torch's per-operation AdamW; megatron's own choice
    stays on GPUs. Called after every optimizer-state load too, which restores the saved groups' settings."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_adam = getattr(inner, "optimizer", None)
        if not isinstance(torch_adam, torch.optim.AdamW):
            continue
        for group in torch_adam.param_groups:
            if all(param.device.type == "cpu" for param in group["params"]):
                group.update(fused=True, foreach=False)


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """apex's multi_tensor_l2norm as megatron calls it: the L2 norm of all tensors of the first list, [1] fp32."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """apex's multi_tensor_scale: dst = src * scale for two lists of tensors (in place when they are the same)."""
    sources, targets = tensor_lists
    if all(source is target for source, target in zip(sources, targets)):
        torch._foreach_mul_(targets, scale)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, scale))


def use_foreach_fallbacks() -> None:
    """Replace megatron's Python-loop fallbacks for apex/TE's multi-tensor kernels (one norm, one temporary and
    one copy per gradient, and a host sync) by torch's foreach ops, where megatron uses those fallbacks."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale
