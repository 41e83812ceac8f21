"""Probe training with the paper's recipe, a whole hyperparameter grid at once, sweep selection and refit.

Recipe (reference code's defaults): AdamW, cosine decay to 1e-6 without warm-up, class-weighted cross-entropy,
at least 1000 steps, grad-norm clip 5, Gaussian feature jitter (sigma 0.05, p 0.5) on training batches (and, with
`jitter_val`, on the validation tokens that score the grid, as the reference's loader does).
All members of a grid see the same batches, jitter and dropout draws, so member m ends with the same weights as
its config trained alone with the same seed; only the compute is shared.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from layerprobe.config import BATCH_PLANS, TrainConfig
from layerprobe.device import resolve_device, resolve_matmul_dtype
from layerprobe.probes import (
    ProbeSpec,
    StackedAttentiveHead,
    build_probe,
    gather_raw,
    normalize_selection,
    set_matmul_dtype,
)


class StreamedRows(Protocol):
    """A selection `[N, K, D]` left in its cache (`layerprobe.selection.StreamedSelection`): sliced into ranges of
    rows like a tensor, its rows read with `read`."""

    shape: torch.Size
    device: torch.device

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> StreamedRows: ...

    def read(self, rows: torch.Tensor | slice) -> torch.Tensor: ...


@dataclass(frozen=True)
class HParams:
    """One point of the sweep grid."""

    lr: float
    weight_decay: float
    attn_dropout: float = 0.0

    @property
    def name(self) -> str:
        """Sweep-head name in DINOv2's style, e.g. "lr1e-03_wd1e-04_do0.1"."""
        return f"lr{self.lr:.0e}_wd{self.weight_decay:.0e}_do{self.attn_dropout:g}"


def make_grid(
    lrs: Sequence[float], weight_decays: Sequence[float], attn_dropouts: Sequence[float] = (0.0,)
) -> list[HParams]:
    """Every (lr, weight decay, attention dropout) combination, lr-major."""
    grid = [HParams(lr, wd, p) for lr, wd, p in itertools.product(lrs, weight_decays, attn_dropouts)]
    if not grid:
        raise ValueError(
            f"empty grid: lrs={list(lrs)}, weight_decays={list(weight_decays)}, attn_dropouts={list(attn_dropouts)}"
        )
    return grid


@dataclass
class TrainedGrid:
    """A trained stacked probe (eval mode) and its per-step history."""

    probe: nn.Module
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    epochs: int = 0


@dataclass
class SweepResult:
    """The chosen config, every member's validation scores and the refit G=1 probe (eval mode)."""

    best: HParams
    best_index: int
    val_scores: list[dict]
    probe: nn.Module
    history: list[dict]


class StackedAdamW:
    """AdamW over parameters with a leading grid dimension, with per-member learning rate and weight decay.

    AdamW's step is p <- p (1 - lr wd) - lr u, with Adam's direction u = m_hat / (sqrt(v_hat) + eps) independent of
    lr and wd. torch's own fused AdamW (CPU and CUDA) computes u for every member in one pass, into a zeroed copy of
    each parameter that it updates at lr 1 without decay; each member's lr and decay are then applied as above: one
    pass whatever the members' lrs (one optimiser group per member measured 3-4x slower for a 12-member ALF grid and
    the per-layer family's refit). A single member is torch's AdamW on the parameters themselves. A parameter without
    a gradient is given a zero one, so it still decays, as in the reference, where such parameters get a numerically
    zero gradient.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        *,
        weight_decay: torch.Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.weight_decay = weight_decay.to(self.params[0].device, torch.float32)
        self.single = len(weight_decay) == 1
        # -u after each step (a member's parameters, when there is only one)
        self.directions = self.params if self.single else [torch.zeros_like(p) for p in self.params]
        fused = all(p.device.type in ("cpu", "cuda") for p in self.params)
        decay = float(weight_decay[0]) if self.single else 0.0
        self.optimizer = torch.optim.AdamW(
            self.directions, lr=1.0, betas=betas, eps=eps, weight_decay=decay, fused=fused
        )
        self.zero_grads: dict[int, torch.Tensor] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor | Sequence[float]) -> None:
        """One update with per-member learning rates `lr  # [G]`."""
        lr = torch.as_tensor(lr, dtype=torch.float32, device=self.weight_decay.device)
        for index, (p, direction) in enumerate(zip(self.params, self.directions, strict=True)):
            if p.grad is None:
                p.grad = self.zero_grads.setdefault(index, torch.zeros_like(p))
            direction.grad = p.grad
        if self.single:
            self.optimizer.param_groups[0]["lr"] = float(lr[0])
            self.optimizer.step()
            return
        torch._foreach_zero_(self.directions)
        self.optimizer.step()
        shapes = [(-1,) + (1,) * (p.dim() - 1) for p in self.params]
        torch._foreach_mul_(self.params, [(1 - lr * self.weight_decay).view(shape) for shape in shapes])
        torch._foreach_addcmul_(self.params, [lr.view(shape) for shape in shapes], self.directions)


@torch.no_grad()
def clip_grad_norm_per_member(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale each member's gradients so its global norm is at most `max_norm`; returns the norms `[G]`."""
    grads = [p.grad for p in params if p.grad is not None]
    # Norms of norms: no squared copy of every gradient (measured ~10x faster for a 12-member ALF grid).
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]), dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
    for g in grads:
        g.mul_(scale.view((-1,) + (1,) * (g.dim() - 1)))
    return norms


def cosine_lr(base_lr: torch.Tensor, step: int, total_steps: int, min_lr: float) -> torch.Tensor:
    """Cosine decay from `base_lr` to `min_lr` over `total_steps`, no warm-up (the reference's schedule)."""
    return min_lr + 0.5 * (1 + math.cos(math.pi * step / total_steps)) * (base_lr - min_lr)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (C * n_c) per class, 0 for classes absent from `labels` (the reference's weighting)."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.where(counts == 0, 0.0, labels.numel() / (num_classes * counts.clamp_min(1)))
    return weights.float()


def even_batch_size(num_images: int, plan_size: int, config: TrainConfig) -> int:
    """Batches evened out over `num_images` (at least `min_batches`, none a runt), planned for the split being
    trained: the tuning split gets its own plan (`plan_size` is not read)."""
    num_batches = max(math.ceil(num_images / config.batch_size), min(config.min_batches, num_images // 2), 1)
    return math.ceil(num_images / num_batches)


def reference_batch_size(num_images: int, plan_size: int, config: TrainConfig) -> int:
    """The reference's plan (`adjust_batch_size`, src/data/data_loader.py, and `create_train_val_loaders`).

    Planned for the full training set of `plan_size` images: `batch_size` stands when it gives at least `min_batches`
    full batches and a remainder of none or at least half a batch; otherwise the largest size down to 17 that gives
    at least that many full batches (`min_batches`, or as many as `batch_size` gave) and such a remainder, which may
    exceed `batch_size`; 1 when none does. The tuning split (`num_images` < `plan_size`) inherits it, one larger when
    it would leave a last batch of one image.
    """

    def fits(size: int, min_full: int) -> bool:
        remainder = plan_size % size
        return plan_size // size >= min_full and (remainder == 0 or remainder >= size / 2)

    min_full = max(config.min_batches, plan_size // config.batch_size)
    if fits(config.batch_size, config.min_batches):
        batch_size = config.batch_size
    else:
        batch_size = next((size for size in range(plan_size // min_full + 1, 16, -1) if fits(size, min_full)), 1)
    if num_images < plan_size and num_images % batch_size == 1:
        batch_size += 1  # a batch of one image would break BatchNorm
    return batch_size


BATCH_SIZES = {"even": even_batch_size, "reference": reference_batch_size}  # train.batch_plan -> batch size rule
assert set(BATCH_SIZES) == set(BATCH_PLANS), "config.BATCH_PLANS names the batch plans defined here"


def batch_plan(num_images: int, config: TrainConfig, *, plan_size: int | None = None) -> tuple[int, int, int]:
    """(batch size, steps per epoch, epochs) for training on `num_images` images, by `config.batch_plan`.

    `plan_size` is the full training set the sweep's tuning split was cut from (the refit's size; None: `num_images`
    itself). Epochs are raised until `min_steps` optimisation steps, as the reference does. Training and
    `layerprobe plan` both count steps here.
    """
    plan_size = num_images if plan_size is None else plan_size
    if plan_size < num_images:
        raise ValueError(f"plan_size {plan_size} is smaller than the {num_images} images being trained on")
    batch_size = BATCH_SIZES[config.batch_plan](num_images, plan_size, config)
    steps_per_epoch = math.ceil(num_images / batch_size)
    epochs = max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))
    return batch_size, steps_per_epoch, epochs


def fits_on_device(features: torch.Tensor, device: torch.device) -> bool:
    """Whether a training selection should be moved to `device` whole: always on the CPU; on a GPU when it takes at
    most half of the free memory (the rest is for the grid's activations, a few GB at batch 2048)."""
    if device.type != "cuda" or features.device == device:
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return features.nbytes <= free // 2


def read_rows(features: torch.Tensor | StreamedRows, rows: torch.Tensor | slice) -> torch.Tensor:
    """Rows of a selection: of a tensor (a slice is a view), or read now from the shards of a selection left in its
    cache (`layerprobe.selection.StreamedSelection`, which gives the same values)."""
    if isinstance(features, torch.Tensor):
        return features[rows.to(features.device) if isinstance(rows, torch.Tensor) else rows]
    return features.read(rows)


def _check_inputs(features: torch.Tensor | StreamedRows, labels: torch.Tensor, num_classes: int) -> None:
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be [N] with N={features.shape[0]}, got shape {tuple(labels.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 training images, got {features.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")


def jitter_tokens(
    x: torch.Tensor, *, std: float, prob: float, generator: torch.Generator, groups: int = 1
) -> torch.Tensor:
    """Gaussian noise of `std` on a random `prob` share of the images of normalised tokens `x  # [b, K, D]`.

    With `groups` > 1 the K tokens are `groups` equal runs (the per-layer family's layers) that all get the noise
    one run would get alone: each group's head then sees what it would see trained on its run by itself.
    """
    chosen = (torch.rand(x.shape[0], generator=generator, device=x.device) < prob).nonzero()[:, 0]
    # Noise only for the images that get it: drawing Gaussians is most of the data path's cost on CPU.
    grouped = x.view(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])
    noise = torch.randn((len(chosen), *grouped.shape[2:]), generator=generator, device=x.device)
    return grouped.index_add(0, chosen, noise[:, None].expand(-1, groups, *noise.shape[1:]), alpha=std).view(x.shape)


def train_selected(
    spec: ProbeSpec,
    features: torch.Tensor | StreamedRows,
    labels: torch.Tensor,
    *,
    num_classes: int,
    grid: Sequence[HParams],
    config: TrainConfig,
    seed: int = 0,
    token_widths: Sequence[int] | None = None,
    plan_size: int | None = None,
    on_step: Callable[[int], None] | None = None,
    head: nn.Module | None = None,
    jitter: Callable[..., torch.Tensor] | None = None,
) -> TrainedGrid:
    """Train every config of `grid` at once on already selected tokens `features  # [N, K, D]` (any dtype), held in
    memory or read batch by batch from their cache (`layerprobe.selection`).

    `token_widths` as in `probes.build_probe`; `plan_size` as in `batch_plan` (the sweep passes its full set's size);
    `on_step(step)` is called after every optimisation step (`layerprobe plan` times steps with it). `head`: an
    initialised head of len(grid) members to train instead of `spec`'s (the per-layer family's, `layerprobe.per_layer`),
    `jitter` a function drawing the jitter instead of `jitter_tokens` (same arguments; the family's).
    """
    _check_inputs(features, labels, num_classes)
    if not grid:
        raise ValueError("grid is empty: give at least one HParams")
    device = resolve_device(config.device)
    num_images, num_tokens, dim = features.shape
    dropouts = [h.attn_dropout for h in grid]
    if head is None:
        head = build_probe(
            spec,
            num_tokens=num_tokens,
            dim=dim,
            num_classes=num_classes,
            grid_size=len(grid),
            attn_dropouts=dropouts,
            seed=seed,
            token_widths=token_widths,
        )
    probe = head.to(device).train()
    set_matmul_dtype(probe, resolve_matmul_dtype(config.precision, device))
    params = list(probe.parameters())
    base_lr = torch.tensor([h.lr for h in grid], device=device)
    decays = torch.tensor([h.weight_decay for h in grid], device=device)
    optimizer = StackedAdamW(params, weight_decay=decays)
    # Selections too large for the device's memory (all-token features of a large dataset) stay on the host, and those
    # too large for the host's in their cache; their batches are gathered there and copied over, one at a time.
    if isinstance(features, torch.Tensor) and fits_on_device(features, device):
        features = features.to(device)
    labels = labels.to(device)
    weights = class_weights(labels, num_classes)

    batch_size, steps_per_epoch, epochs = batch_plan(num_images, config, plan_size=plan_size)
    total_steps = steps_per_epoch * epochs
    # Separate generators, so drawing (or not) one kind of randomness never shifts another.
    shuffle_gen = torch.Generator().manual_seed(seed)
    jitter_gen = torch.Generator(device=device).manual_seed(seed + 1)
    dropout_gen = torch.Generator(device=device).manual_seed(seed + 2)
    attentive = isinstance(probe, StackedAttentiveHead)
    history: list[dict] = []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(num_images, generator=shuffle_gen).to(device)
        for start in range(0, num_images, batch_size):
            rows = order[start : start + batch_size]
            x = normalize_selection(read_rows(features, rows).to(device).float(), spec.normalize)  # [b, K, D]
            b = x.shape[0]
            x = (jitter or jitter_tokens)(x, std=config.jitter_std, prob=config.jitter_prob, generator=jitter_gen)
            dropout_noise = None
            if attentive:  # drawn every step for every grid, so a lone member sees the same masks
                dropout_noise = torch.rand(b, probe.num_heads, num_tokens, generator=dropout_gen, device=device)
            logits = probe(x, dropout_noise=dropout_noise)  # [G, b, C]
            y = labels[rows]
            per_image = F.cross_entropy(
                logits.permute(1, 2, 0), y[:, None].expand(-1, len(grid)), weight=weights, reduction="none"
            )
            member_loss = per_image.sum(0) / weights[y].sum()  # each member's weighted mean, as CrossEntropyLoss
            lr = cosine_lr(base_lr, step, total_steps, config.min_lr)
            optimizer.zero_grad()
            member_loss.sum().backward()  # members share no parameters, so their gradients stay independent
            clip_grad_norm_per_member(params, config.grad_clip)
            optimizer.step(lr)
            step += 1
            if step % config.log_every == 0 or step == total_steps:
                history.append({"step": step, "loss": member_loss.detach().cpu().tolist(), "lr": lr.cpu().tolist()})
            if on_step is not None:
                on_step(step)
    set_matmul_dtype(probe, torch.float32)  # predictions from the trained probe are computed in full precision
    return TrainedGrid(probe=probe.eval(), history=history, steps=total_steps, epochs=epochs)


def train_grid(
    spec: ProbeSpec,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    positions: Sequence[tuple[int, int]],
    num_classes: int,
    grid: Sequence[HParams],
    config: TrainConfig,
    seed: int = 0,
    patches: torch.Tensor | None = None,
    width: int | None = None,
    token_widths: Sequence[int] | None = None,
) -> TrainedGrid:
    """Train all configs of `grid` at once on the same batches.

    Args:
        spec: the probe.
        tokens: cached features `[N, L, T, D]` (float16 usually; never written to).
        labels: `[N]` int64 class indices.
        positions: slots from `select_token_positions`.
        num_classes: C.
        grid: hyperparameters, one per member.
        config: the shared recipe (its grid lists are not read here: `grid` is).
        seed: initialisation, shuffling, jitter and dropout draws.
        patches: the final layer's patch tokens `[N, P, D_final]`, for probes that read them.
        width: token width to read (`probes.reading_widths`); None reads all D.
        token_widths: per-token widths a linear head concatenates unpadded (`probes.reading_widths`).

    Returns:
        The stacked probe (G = len(grid), eval mode) and the loss/lr history.
    """
    features = gather_raw(tokens, positions, patches=patches, width=width)
    return train_selected(
        spec, features, labels, num_classes=num_classes, grid=grid, config=config, seed=seed, token_widths=token_widths
    )


@torch.no_grad()
def predict_selected(
    probe: nn.Module,
    features: torch.Tensor | StreamedRows,
    *,
    batch_size: int = 4096,
    normalize: str = "token",
    jitter_std: float = 0.0,
    jitter_prob: float = 0.0,
    jitter_seed: int = 0,
    keep: torch.Tensor | None = None,
    jitter: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Predictions `[G, N]`, logits `[G, N, C]` and attention `[G, N, H, K]` (or None) on selected tokens.

    `keep`: `[K]` bool, the tokens an attentive probe attends to (`StackedAttentiveHead.forward`); None: all.
    `jitter` as in `train_selected`.

    Tokens are normalised as the probe was trained (`normalize`, its spec's `probes.normalize_selection` rule). A
    non-zero `jitter_std` and `jitter_prob` add the training jitter to the normalised tokens first, drawn from a
    generator seeded with `jitter_seed` (and batch by batch): every member sees the same noisy tokens, a rerun the
    same noise.
    """
    was_training = probe.training
    probe.eval()
    device = next(probe.parameters()).device
    jittering = jitter_std > 0 and jitter_prob > 0
    generator = torch.Generator(device=device).manual_seed(jitter_seed) if jittering else None
    logits, attention = [], []
    for start in range(0, features.shape[0], batch_size):
        x = normalize_selection(read_rows(features, slice(start, start + batch_size)).to(device).float(), normalize)
        if generator is not None:
            x = (jitter or jitter_tokens)(x, std=jitter_std, prob=jitter_prob, generator=generator)
        batch_logits, batch_attention = probe(x, return_attention=True, **({} if keep is None else {"keep": keep}))
        logits.append(batch_logits.cpu())
        if batch_attention is not None:
            attention.append(batch_attention.cpu())
    probe.train(was_training)
    all_logits = torch.cat(logits, dim=1)
    return all_logits.argmax(-1), all_logits, torch.cat(attention, dim=1) if attention else None


def predict(
    probe: nn.Module,
    tokens: torch.Tensor,
    *,
    positions: Sequence[tuple[int, int]],
    batch_size: int = 4096,
    patches: torch.Tensor | None = None,
    width: int | None = None,
    normalize: str = "token",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Batched eval-mode predictions of a G=1 probe on cached features `[N, L, T, D]`.

    Tokens are gathered one batch at a time, so no copy of the whole selection is made (patch tokens are large).
    `patches` and `width` as in `train_grid`, `normalize` as in `predict_selected`; `checkpoint.reading_arguments`
    gives a saved probe's positions, width and normalisation.

    Returns:
        predictions `[N]`, logits `[N, C]`, attention `[N, H, K]` (None for linear heads). A grid probe (G > 1)
        keeps a leading G on every output.
    """
    outputs = []
    for start in range(0, tokens.shape[0], batch_size):
        rows = torch.arange(start, min(start + batch_size, tokens.shape[0]))
        features = gather_raw(tokens, positions, rows=rows, patches=patches, width=width)
        outputs.append(predict_selected(probe, features, batch_size=batch_size, normalize=normalize))
    predictions, logits = torch.cat([o[0] for o in outputs], dim=1), torch.cat([o[1] for o in outputs], dim=1)
    attention = None if outputs[0][2] is None else torch.cat([o[2] for o in outputs], dim=1)
    if predictions.shape[0] == 1:
        return predictions[0], logits[0], None if attention is None else attention[0]
    return predictions, logits, attention


def member_scores(hparams: HParams, truth, guess) -> dict:
    """One grid member's validation scores on labels `truth` from its predictions `guess`, as sweep.json lists them."""
    return {
        "name": hparams.name,
        "lr": hparams.lr,
        "weight_decay": hparams.weight_decay,
        "attn_dropout": hparams.attn_dropout,
        "balanced_accuracy": float(balanced_accuracy_score(truth, guess)),
        "accuracy": float((guess == truth).mean()),
    }


def sweep_probe(
    spec: ProbeSpec,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    val_tokens: torch.Tensor,
    val_labels: torch.Tensor,
    positions: Sequence[tuple[int, int]],
    num_classes: int,
    grid: Sequence[HParams],
    config: TrainConfig,
    seed: int = 0,
    patches: torch.Tensor | None = None,
    val_patches: torch.Tensor | None = None,
    width: int | None = None,
    token_widths: Sequence[int] | None = None,
) -> SweepResult:
    """Train the grid on train, pick the best member by validation balanced accuracy, refit it on train+val.

    Ties go to the first member in grid order. The refit is a G=1 run with the same recipe and seed. With
    `config.jitter_val` the validation tokens get the training jitter (seeded by `seed`) before scoring; only the
    choice of member depends on it. `patches`, `val_patches`, `width` and `token_widths` as in `train_grid`.
    """
    train_features = gather_raw(tokens, positions, patches=patches, width=width)
    val_features = gather_raw(val_tokens, positions, patches=val_patches, width=width)
    features = torch.cat([train_features, val_features.to(train_features.dtype)])
    return sweep_selected(
        spec,
        features,
        torch.cat([labels, val_labels]),
        num_train=len(train_features),
        num_classes=num_classes,
        grid=grid,
        config=config,
        seed=seed,
        token_widths=token_widths,
    )


def sweep_selected(
    spec: ProbeSpec,
    features: torch.Tensor | StreamedRows,
    labels: torch.Tensor,
    *,
    num_train: int,
    num_classes: int,
    grid: Sequence[HParams],
    config: TrainConfig,
    seed: int = 0,
    token_widths: Sequence[int] | None = None,
) -> SweepResult:
    """`sweep_probe` on already selected tokens `[N, K, D]`: the first `num_train` rows are the training split, the
    rest validation. Both are views and the refit trains on the whole tensor, so the selection is never copied (a
    caller gathers it once, for every seed, or leaves it in its cache: `layerprobe.selection`). The tuning split's
    batches are planned for the whole set (`batch_plan`'s `plan_size`), which only `train.batch_plan: reference`
    reads."""
    if not 0 < num_train < len(features):
        raise ValueError(f"num_train must leave rows for both splits, got {num_train} of {len(features)}")
    train_features, val_features, val_labels = features[:num_train], features[num_train:], labels[num_train:]
    trained = train_selected(
        spec,
        train_features,
        labels[:num_train],
        num_classes=num_classes,
        grid=grid,
        config=config,
        seed=seed,
        token_widths=token_widths,
        plan_size=len(features),
    )
    predictions, _, _ = predict_selected(
        trained.probe,
        val_features,
        normalize=spec.normalize,
        jitter_std=config.jitter_std if config.jitter_val else 0.0,
        jitter_prob=config.jitter_prob,
        jitter_seed=seed + 3,  # its own stream: training's shuffle, jitter and dropout use seed .. seed + 2
    )
    truth = val_labels.cpu().numpy()
    val_scores = []
    for hparams, member_predictions in zip(grid, predictions, strict=True):
        val_scores.append(member_scores(hparams, truth, member_predictions.numpy()))
    best_index = max(range(len(grid)), key=lambda i: (val_scores[i]["balanced_accuracy"], -i))
    best = grid[best_index]
    refit = train_selected(
        spec,
        features,
        labels,
        num_classes=num_classes,
        grid=[best],
        config=config,
        seed=seed,
        token_widths=token_widths,
    )
    return SweepResult(
        best=best, best_index=best_index, val_scores=val_scores, probe=refit.probe, history=refit.history
    )
