"""Pretraining small ViTs from scratch on a generated task, so the offline suite probes backbones that learned
something (the paper's finding is about pretrained models: tasks far from pretraining read intermediate layers).

One objective so far, registered by name like probes and sources:
    supervised  classify the source's labels through the model's own head (cross-entropy with label smoothing,
                AdamW, linear warm-up then cosine decay, gradient clipping, random horizontal flips).
Training is float32 and seeded (initialisation, batches, flips), so the same config gives the same weights on a
machine. Cost: a 6-block, 64-wide ViT on 32-px images with 8-px patches trains at ~2,000 images/s on 2 CPU cores
(measured), so the default 900 steps of 128 take about a minute.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from layerprobe.config import PretrainConfig
from layerprobe.registry import Registry

Objective = Callable[..., "PretrainResult"]
_OBJECTIVES: Registry[Objective] = Registry("pretraining objective")
register_objective = _OBJECTIVES.register


def list_objectives() -> list[str]:
    return _OBJECTIVES.names()


@dataclass
class PretrainResult:
    """What a pretraining run reports: held-out accuracy and the loss every `log_every` steps."""

    held_out_accuracy: float
    history: list[dict] = field(default_factory=list)


def warmup_cosine_lr(config: PretrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to zero at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    held_out: tuple[torch.Tensor, torch.Tensor],
    config: PretrainConfig,
    device: torch.device,
    progress: bool = True,
) -> PretrainResult:
    """Train `model` in place with the config's objective on normalised images `[N, 3, H, W]` and their labels."""
    return _OBJECTIVES.get(config.objective)(
        model, images, labels, held_out=held_out, config=config, device=device, progress=progress
    )


@register_objective("supervised")
def pretrain_supervised(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    held_out: tuple[torch.Tensor, torch.Tensor],
    config: PretrainConfig,
    device: torch.device,
    progress: bool = True,
) -> PretrainResult:
    """Classify `labels` through the model's head; returns the held-out accuracy and the loss curve."""
    model.to(device).train()
    decay = [p for name, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in name]
    rest = [p for name, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in name)]
    # Norms, biases, tokens and position embeddings are not decayed (the usual ViT recipe).
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    log_every = max(1, config.steps // 50)
    history = []
    for step in tqdm(range(config.steps), desc="pretrain", unit="step", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(config, step)
        rows = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        flip = torch.rand(config.batch_size, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], images[rows].flip(-1), images[rows]).to(device)
        loss = F.cross_entropy(model(batch), labels[rows].to(device), label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
    model.eval()
    with torch.no_grad():
        test_images, test_labels = held_out
        guesses = torch.cat([model(chunk.to(device)).argmax(-1).cpu() for chunk in test_images.split(512)])
    return PretrainResult(held_out_accuracy=float((guesses == test_labels).float().mean()), history=history)


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without its classifier head: what a probed backbone (num_classes=0) loads."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
