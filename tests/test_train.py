"""Training: planted layer signals are found, a grid trained at once equals its members trained alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from layerprobe.config import TrainConfig
from layerprobe.device import native_bfloat16, resolve_matmul_dtype
from layerprobe.metrics import classification_metrics, layer_attention_heatmap
from layerprobe.probes import extract_member, gather_raw, get_probe_spec, select_token_positions, token_labels
from layerprobe.train import (
    HParams,
    StackedAdamW,
    batch_plan,
    class_weights,
    clip_grad_norm_per_member,
    make_grid,
    predict,
    sweep_probe,
    sweep_selected,
    train_grid,
    train_selected,
)

LAYERS = ["block0", "block1", "block2", "block3", "block4", "final"]
TOKENS = ["cls", "ap"]
FAST = TrainConfig(epochs=1, min_steps=150, batch_size=128, device="cpu")


def planted(num_images: int, *, signal: dict[int, int], num_classes: int, dim: int = 32, seed: int = 0):
    """Cache-like tokens [N, 6, 2, D] (float16) where only the `ap` token of the layers in `signal` carries labels.

    `signal` maps a layer index to the bits of the label it encodes: {3: 0} puts the whole label in block3/ap;
    {1: 0, 4: 1} puts label bit 0 in block1/ap and bit 1 in final/ap, so a probe needs both layers.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_images,), generator=generator)
    tokens = torch.randn(num_images, len(LAYERS), 2, dim, generator=generator)
    for layer, bit in signal.items():
        codes = labels if len(signal) == 1 else (labels >> bit) & 1
        means = 4.0 * torch.randn(int(codes.max()) + 1, dim, generator=generator)
        tokens[:, layer, 1] = means[codes] + torch.randn(num_images, dim, generator=generator)
    return tokens.half(), labels


def fit_and_score(
    name: str, tokens, labels, test_tokens, test_labels, num_classes: int, lr: float = 1e-2, precision: str = "float32"
):
    spec = get_probe_spec(name)
    positions = select_token_positions(LAYERS, TOKENS, layers=spec.layers, tokens=spec.tokens)
    trained = train_grid(
        spec,
        tokens,
        labels,
        positions=positions,
        num_classes=num_classes,
        grid=[HParams(lr, 1e-4)],
        config=replace(FAST, precision=precision),
    )
    assert trained.probe.matmul_dtype == torch.float32  # evaluation always computes in full precision
    guess, _, attention = predict(trained.probe, test_tokens, positions=positions, batch_size=256)
    accuracy = classification_metrics(test_labels, guess, num_classes)["accuracy"]
    return accuracy, attention, token_labels(LAYERS, TOKENS, positions)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_alf_finds_the_one_layer_that_holds_the_label(precision):
    tokens, labels = planted(900, signal={3: 0}, num_classes=4)
    train, test = slice(0, 600), slice(600, 900)
    accuracy, attention, names = fit_and_score(
        "alf", tokens[train], labels[train], tokens[test], labels[test], 4, precision=precision
    )
    assert accuracy > 0.9
    heatmap = layer_attention_heatmap(attention, names)
    top = max(heatmap["token_weights"], key=heatmap["token_weights"].get)
    assert top == "block3/ap"
    baseline, _, _ = fit_and_score("linear_last_cls", tokens[train], labels[train], tokens[test], labels[test], 4)
    assert baseline < 0.45  # chance is 0.25: the final cls token holds nothing


def test_alf_attends_to_both_layers_when_the_label_needs_both():
    tokens, labels = planted(900, signal={1: 0, 5: 1}, num_classes=4, seed=1)
    train, test = slice(0, 600), slice(600, 900)
    accuracy, attention, names = fit_and_score("alf", tokens[train], labels[train], tokens[test], labels[test], 4)
    assert accuracy > 0.85
    weights = layer_attention_heatmap(attention, names)["token_weights"]
    top_two = sorted(weights, key=weights.get, reverse=True)[:2]
    assert set(top_two) == {"block1/ap", "final/ap"}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_grid_trained_at_once_equals_each_config_trained_alone(precision):
    tokens, labels = planted(200, signal={2: 0}, num_classes=3, seed=2)
    spec = get_probe_spec("alf")
    positions = select_token_positions(LAYERS, TOKENS, layers="paper", tokens=("cls", "ap"))
    config = TrainConfig(epochs=1, min_steps=25, batch_size=64, device="cpu", precision=precision)
    grid = [HParams(1e-2, 1e-4, 0.0), HParams(1e-2, 1e-1, 0.3), HParams(1e-3, 1e-4, 0.1), HParams(3e-2, 0.0, 0.3)]
    together = train_grid(spec, tokens, labels, positions=positions, num_classes=3, grid=grid, config=config, seed=5)
    assert together.steps == 25 and together.history[-1]["step"] == 25
    for m, hparams in enumerate(grid):
        alone = train_grid(
            spec, tokens, labels, positions=positions, num_classes=3, grid=[hparams], config=config, seed=5
        ).probe.state_dict()
        member = extract_member(together.probe, m).state_dict()
        for key, value in alone.items():
            if precision == "float32":
                torch.testing.assert_close(member[key], value, atol=1e-5, rtol=1e-5, msg=f"member {m} {key}")
            elif value.is_floating_point():
                # bfloat16 rounds each matmul's result: a last-bit difference in float32 accumulation (the grid's
                # matmuls are wider) can round the other way, and 25 steps at lr 3e-2 grow it to ~2e-3 (measured).
                relative = (member[key] - value).norm() / value.norm().clamp_min(1e-12)
                assert relative < 1e-2, f"member {m} {key}: relative difference {relative:.1e}"
    members = [extract_member(together.probe, m).state_dict()["k_weight"] for m in range(4)]
    assert not torch.allclose(members[0], members[1])  # the configs really trained differently


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    tokens, labels = planted(150, signal={4: 0}, num_classes=3, seed=3)
    spec = get_probe_spec("linear_concat_all")
    positions = select_token_positions(LAYERS, TOKENS, layers="paper", tokens=("cls", "ap"))
    config = TrainConfig(epochs=1, min_steps=20, batch_size=32, device="cpu")

    def weights(seed: int) -> torch.Tensor:
        grid = make_grid([1e-2], [1e-3])
        return train_grid(
            spec, tokens, labels, positions=positions, num_classes=3, grid=grid, config=config, seed=seed
        ).probe.weight

    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(2))


def test_stacked_adamw_matches_torch_adamw_for_one_member():
    generator = torch.Generator().manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(1, 5, 3, generator=generator))
    theirs = torch.nn.Parameter(ours.detach()[0].clone())
    optimizer = StackedAdamW([ours], weight_decay=torch.tensor([0.05]))
    reference = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.05)
    for step in range(6):
        grad = torch.randn(5, 3, generator=generator)
        lr = 1e-2 * (1 - step / 10)
        for group in reference.param_groups:
            group["lr"] = lr
        ours.grad, theirs.grad = grad[None].clone(), grad.clone()
        optimizer.step(torch.tensor([lr]))
        reference.step()
    torch.testing.assert_close(ours.detach()[0], theirs.detach(), atol=1e-7, rtol=1e-6)
    assert not torch.allclose(ours.detach()[0], theirs.detach() + 1e-3)


def test_clipping_is_per_member_and_matches_torch():
    big, small = torch.full((3,), 10.0), torch.full((3,), 0.1)
    param = torch.nn.Parameter(torch.zeros(2, 3))
    param.grad = torch.stack([big, small])
    reference = torch.nn.Parameter(torch.zeros(3))
    reference.grad = big.clone()
    torch.nn.utils.clip_grad_norm_([reference], 5.0)
    clip_grad_norm_per_member([param], 5.0)
    torch.testing.assert_close(param.grad[0], reference.grad)
    assert torch.equal(param.grad[1], small)  # under the limit: untouched


def test_precision_resolves_auto_by_hardware_and_names_bad_values(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_matmul_dtype("float32", cpu) == torch.float32
    assert resolve_matmul_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_matmul_dtype("auto", cpu) == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_bfloat16(cpu) and resolve_matmul_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_matmul_dtype("auto", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="precision 'half'"):
        resolve_matmul_dtype("half", cpu)
    with pytest.raises(ValueError, match="train.precision must be one of .*'fp8'"):
        TrainConfig(precision="fp8")


def test_bfloat16_training_is_deterministic_and_differs_from_float32():
    tokens, labels = planted(200, signal={3: 0}, num_classes=3, seed=6)
    spec = get_probe_spec("alf")
    positions = select_token_positions(LAYERS, TOKENS, layers="paper", tokens=("cls", "ap"))

    def weights(precision: str) -> torch.Tensor:
        config = TrainConfig(epochs=1, min_steps=10, batch_size=64, device="cpu", precision=precision)
        return train_grid(
            spec, tokens, labels, positions=positions, num_classes=3, grid=make_grid([1e-2], [1e-4]), config=config
        ).probe.k_weight

    assert torch.equal(weights("bfloat16"), weights("bfloat16"))
    assert not torch.equal(weights("bfloat16"), weights("float32"))


def test_recipe_helpers_follow_the_reference():
    assert class_weights(torch.tensor([0, 0, 0, 1]), 3).tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])
    batch, steps_per_epoch, epochs = batch_plan(1000, TrainConfig(epochs=2, min_steps=1000, batch_size=300))
    assert (batch, steps_per_epoch) == (200, 5)  # 4 batches of 300 would leave a runt; at least 5 batches
    assert steps_per_epoch * epochs >= 1000 and epochs == 200
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")


# The reference's batch plan, worked out by running its code on each size: `adjust_batch_size(2048, N)`
# (src/data/data_loader.py: at least 5 full batches, a remainder of none or at least half a batch, else the largest
# size from N // max(5, N // 2048) + 1 down to 17 that gives both, else 1); the tuning split of N - ceil(0.2 N) images
# (`create_train_val_loaders`, src/data/data_utils.py) inherits that size, +1 when its last batch would hold one image;
# epochs 40, raised to ceil(1000 / batches per epoch) below 1000 steps (src/tasks/linear_probe.py).
# (N, batch, steps per epoch, epochs, tuning images, tuning batch, its steps per epoch, its epochs)
REFERENCE_BATCH_PLANS = [
    (84, 1, 84, 40, 67, 1, 67, 40),  # no size from 17 up fits: the reference falls back to batch 1
    (85, 17, 5, 200, 68, 17, 4, 250),
    (500, 100, 5, 200, 400, 100, 4, 250),
    (1020, 204, 5, 200, 816, 204, 4, 250),  # Flowers
    (1880, 376, 5, 200, 1504, 376, 4, 250),  # DTD
    (2753, 500, 6, 167, 2202, 500, 5, 200),  # Caltech-101
    (3334, 606, 6, 167, 2667, 606, 5, 200),  # FGVC Aircraft
    (5000, 1000, 5, 200, 4000, 1000, 4, 250),  # STL-10
    (8144, 1480, 6, 167, 6515, 1480, 5, 200),  # Stanford Cars
    (10245, 2049, 5, 200, 8196, 2049, 4, 250),  # more than 2048: 5 x 2048 leaves a remainder of 5
    (14342, 1912, 8, 125, 11473, 1913, 6, 167),  # the tuning split would end in one image: +1
    (16200, 2048, 8, 125, 12960, 2048, 7, 143),  # EuroSAT
    (18900, 2100, 9, 112, 15120, 2100, 8, 125),  # RESISC45
    (26640, 1973, 14, 72, 21312, 1973, 11, 91),  # GTSRB
    (35126, 2007, 18, 56, 28100, 2007, 15, 67),  # Diabetic Retinopathy
    (45000, 2048, 22, 46, 36000, 2048, 18, 56),  # CIFAR-10/100
    (65550, 2016, 33, 40, 52440, 2016, 27, 40),  # DMLab
    (262144, 2048, 128, 40, 209715, 2048, 103, 40),  # PCAM
    (1281167, 2048, 626, 40, 1024933, 2048, 501, 40),  # ImageNet-1k
]


def test_reference_batch_plan_matches_the_reference_code_from_500_to_1_3m_images():
    config = TrainConfig(batch_plan="reference")  # batch 2048, >= 5 batches, 40 epochs, >= 1000 steps
    for full, batch, steps, epochs, tuning, tuning_batch, tuning_steps, tuning_epochs in REFERENCE_BATCH_PLANS:
        assert batch_plan(full, config) == (batch, steps, epochs), full
        assert batch_plan(tuning, config, plan_size=full) == (tuning_batch, tuning_steps, tuning_epochs), full
    # ours (the default) evens batches out and plans the tuning split on its own
    assert batch_plan(816, TrainConfig(), plan_size=1020) == batch_plan(816, TrainConfig()) == (164, 5, 200)
    with pytest.raises(ValueError, match=r"train.batch_plan must be one of \('even', 'reference'\), got 'ref'"):
        TrainConfig(batch_plan="ref")


def test_the_sweep_plans_its_tuning_batches_for_the_full_set_and_training_follows_the_plan(monkeypatch):
    import layerprobe.train as train_module

    tokens, labels = planted(500, signal={5: 0}, num_classes=3, seed=4)
    spec = get_probe_spec("linear_last_cls_ap")
    positions = select_token_positions(LAYERS, TOKENS, layers=spec.layers, tokens=spec.tokens)
    features = gather_raw(tokens, positions)  # [500, 2, D]: final cls, ap
    config = TrainConfig(epochs=1, min_steps=10, device="cpu", batch_plan="reference")
    grid = make_grid([1e-2], [1e-4])
    # 400 of 500 images: the reference's batch of 100 (4 per epoch, 3 epochs to reach 10 steps); ours re-plans 400
    trained = train_selected(spec, features[:400], labels[:400], num_classes=3, grid=grid, config=config, plan_size=500)
    assert (trained.steps, trained.epochs) == (4 * 3, 3)
    even = train_selected(
        spec,
        features[:400],
        labels[:400],
        num_classes=3,
        grid=grid,
        config=replace(config, batch_plan="even"),
        plan_size=500,
    )
    assert (even.steps, even.epochs) == (5 * 2, 2)  # 5 batches of 80

    calls = []
    monkeypatch.setattr(train_module, "batch_plan", lambda *a, **k: calls.append((a[0], k)) or batch_plan(*a, **k))
    sweep_selected(spec, features, labels, num_train=400, num_classes=3, grid=grid, config=config)
    assert calls == [(400, {"plan_size": 500}), (500, {"plan_size": None})]  # the grid, then the refit


def test_sweep_picks_by_validation_balanced_accuracy_and_refits_one_probe():
    tokens, labels = planted(500, signal={5: 0}, num_classes=3, seed=4)
    spec = get_probe_spec("linear_last_cls_ap")
    positions = select_token_positions(LAYERS, TOKENS, layers=spec.layers, tokens=spec.tokens)
    grid = make_grid([1e-2, 1e-7], [1e-4])  # lr 1e-7 barely moves: it must lose
    result = sweep_probe(
        spec,
        tokens[:300],
        labels[:300],
        val_tokens=tokens[300:400],
        val_labels=labels[300:400],
        positions=positions,
        num_classes=3,
        grid=grid,
        config=TrainConfig(epochs=1, min_steps=60, batch_size=64, device="cpu"),
    )
    assert result.best == grid[0] and result.best_index == 0
    assert len(result.val_scores) == 2
    assert result.val_scores[0]["balanced_accuracy"] > result.val_scores[1]["balanced_accuracy"]
    assert result.probe.grid_size == 1 and not result.probe.training
    guess, logits, attention = predict(result.probe, tokens[400:], positions=positions)
    assert guess.shape == (100,) and logits.shape == (100, 3) and attention is None
    assert np.mean(guess.numpy() == labels[400:].numpy()) > 0.9


def test_stacked_adamw_gives_each_member_its_own_lr_and_decay_and_decays_gradless_params():
    generator = torch.Generator().manual_seed(1)
    stacked = torch.nn.Parameter(torch.randn(3, 4, 2, generator=generator))
    gradless = torch.nn.Parameter(torch.ones(3, 2))
    lrs, decays = [1e-2, 1e-3, 3e-2], [0.0, 0.1, 0.5]
    optimizer = StackedAdamW([stacked, gradless], weight_decay=torch.tensor(decays))
    references = [torch.nn.Parameter(stacked.detach()[m].clone()) for m in range(3)]
    torch_optimizers = [
        torch.optim.AdamW([ref], lr=lr, weight_decay=wd) for ref, lr, wd in zip(references, lrs, decays, strict=True)
    ]
    for _ in range(4):
        grad = torch.randn(3, 4, 2, generator=generator)
        optimizer.zero_grad()
        stacked.grad = grad.clone()
        optimizer.step(torch.tensor(lrs))
        for m, (ref, torch_optimizer) in enumerate(zip(references, torch_optimizers, strict=True)):
            ref.grad = grad[m].clone()
            torch_optimizer.step()
    for m, ref in enumerate(references):
        torch.testing.assert_close(stacked.detach()[m], ref.detach(), atol=1e-7, rtol=1e-6)
    # No gradient: Adam's step is zero, only decoupled decay acts: (1 - lr * wd) ** 4.
    expected = torch.tensor([(1 - lr * wd) ** 4 for lr, wd in zip(lrs, decays, strict=True)])
    torch.testing.assert_close(gradless.detach()[:, 0], expected)


def test_jitter_touches_only_training_batches_and_only_the_chosen_images():
    tokens, labels = planted(64, signal={4: 0}, num_classes=2, seed=4)
    spec = get_probe_spec("linear_concat_all")
    positions = select_token_positions(LAYERS, TOKENS, layers="paper", tokens=("cls", "ap"))

    def weights(**jitter) -> torch.Tensor:
        config = TrainConfig(epochs=1, min_steps=5, batch_size=64, device="cpu", **jitter)
        grid = make_grid([1e-2], [0.0])
        return train_grid(
            spec, tokens, labels, positions=positions, num_classes=2, grid=grid, config=config
        ).probe.weight

    assert torch.equal(weights(jitter_prob=0.0), weights(jitter_std=0.0))  # no image chosen == zero noise
    assert not torch.equal(weights(jitter_prob=0.5), weights(jitter_prob=0.0))


def test_jitter_val_changes_only_the_validation_scores_and_reproducibly():
    tokens, labels = planted(400, signal={5: 0}, num_classes=3, seed=5)
    spec = get_probe_spec("linear_last_cls_ap")
    positions = select_token_positions(LAYERS, TOKENS, layers=spec.layers, tokens=spec.tokens)
    grid = make_grid([1e-2, 1e-3], [1e-4])
    # A large jitter, so the noisy validation tokens move the scores visibly at this size.
    config = TrainConfig(epochs=1, min_steps=30, batch_size=64, device="cpu", jitter_std=0.5)

    def sweep(train_config: TrainConfig):
        return sweep_probe(
            spec,
            tokens[:250],
            labels[:250],
            val_tokens=tokens[250:],
            val_labels=labels[250:],
            positions=positions,
            num_classes=3,
            grid=grid,
            config=train_config,
        )

    off, on, again = sweep(config), sweep(replace(config, jitter_val=True)), sweep(replace(config, jitter_val=True))
    scores = [[s["accuracy"] for s in result.val_scores] for result in (off, on, again)]
    assert scores[1] != scores[0]  # selection sees the noisy tokens
    assert scores[1] == scores[2]  # seeded: the same noise every run
    # Off is today's sweep: the scores of the grid trained alone, predicted on the clean tokens.
    trained = train_grid(spec, tokens[:250], labels[:250], positions=positions, num_classes=3, grid=grid, config=config)
    clean, _, _ = predict(trained.probe, tokens[250:], positions=positions)
    assert scores[0] == [float((member.numpy() == labels[250:].numpy()).mean()) for member in clean]
    # Only the scores change: the same member wins here, and its refit is the one without jitter_val.
    assert on.best == off.best and torch.equal(on.probe.weight, off.probe.weight)
