"""The per-layer probe family: for every cached layer, a linear probe on its CLS, its AP and CLS‖AP, trained at once.

Every (token kind, layer l, grid point g) head is one member of one stacked head (`FamilyHead`) trained on one
selection of the cache (every layer's cls and ap): one read of each batch, one optimiser step and one clip for all
3 x L x G of them. Each member computes what a `linear` probe with `layers: [l]`, `tokens` = its kind and
`pad_final: true` computes trained alone with the same recipe and seed: same batches, same jitter (`family_jitter`),
same initialisation, its own lr and decay. Every layer is read at the cache's common width, so a narrower final layer
(CLIP's projection) is read zero-padded, as with `pad_final: true`.

Selection is per (kind, layer), on val, as every probe's sweep (ties to the first grid point), and the refit on
train+val trains every (kind, layer)'s chosen member at once. The family's headline probe is the (layer, kind) with
the best val balanced accuracy (mean over seeds; ties to the first in layer, then kind order): it is saved as the
standard probe, a linear probe reading that one layer, so evaluate, the registry and `layerprobe predict` (through
the backbone only as deep as that layer) read it like any other. The stacked refit heads are saved beside it
(`per_layer.safetensors` + `per_layer.json`) for the curves evaluate writes (`layer_evaluation.per_layer_curves`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerprobe.probes import StackedLinearHead

PER_LAYER = "per_layer"
KINDS = {"cls": ("cls",), "ap": ("ap",), "cls_ap": ("cls", "ap")}  # token kind -> the tokens it reads of a layer
FAMILY_WEIGHTS, FAMILY_CONFIG = "per_layer.safetensors", "per_layer.json"


class FamilyHead(nn.Module):
    """Every layer's linear probes of every token kind, `members` (grid points) each, as one stacked head: tokens
    `[B, 2L, D]` (cls@l, ap@l, ...) -> logits `[3 * L * members, B, C]`, member (kind k, layer l, point g) at index
    (k * L + l) * members + g, kinds in `KINDS` order.

    One weight `[3 L G, C, 2D]` holds them all, so one optimiser step and one clip serve every head: a cls or ap
    head uses its first D columns (the rest stay exactly zero: they get no gradient and decay from zero to zero),
    a cls‖ap head all 2D. Every head is initialised as a G=1 `StackedLinearHead` of its inputs with the same seed.
    Given `[B, 4L, D]` (`family_jitter`'s), the cls and ap heads read the first 2L tokens, the cls‖ap heads the rest.
    """

    def __init__(self, num_layers: int, members: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_layers, self.members, self.dim, self.num_classes = num_layers, members, dim, num_classes
        self.grid_size = len(KINDS) * num_layers * members
        self.weight = nn.Parameter(torch.empty(self.grid_size, num_classes, 2 * dim))
        self.bias = nn.Parameter(torch.empty(self.grid_size, num_classes))
        self.matmul_dtype = torch.float32  # see `probes.set_matmul_dtype`
        self.reset_parameters(seed=0)

    @torch.no_grad()
    def reset_parameters(self, *, seed: int) -> None:
        """Every head as `StackedLinearHead.reset_parameters(seed=seed)` initialises one of its inputs' width."""
        weight = self.weight.view(len(KINDS), -1, self.num_classes, 2 * self.dim)
        bias = self.bias.view(len(KINDS), -1, self.num_classes)
        weight.zero_()
        for k, tokens in enumerate(KINDS.values()):
            head = StackedLinearHead(1, len(tokens) * self.dim, self.num_classes)
            head.reset_parameters(seed=seed)
            weight[k, :, :, : head.in_features] = head.weight
            bias[k] = head.bias

    def forward(
        self, x: torch.Tensor, *, return_attention: bool = False, dropout_noise: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, None]:
        batch, layers, d = x.shape[0], self.num_layers, self.dim
        if x.shape[1:] not in ((2 * layers, d), (4 * layers, d)):
            raise ValueError(
                f"per-layer head expects [B, {2 * layers} or {4 * layers}, {d}] tokens, got {list(x.shape)}"
            )
        single, pairs = (x, x) if x.shape[1] == 2 * layers else (x[:, : 2 * layers], x[:, 2 * layers :])
        dtype = self.matmul_dtype
        # Weights [kind, layer, G C, width] @ tokens [kind, layer, width, B], no copy of the weight: for these small
        # matrices measured 1.6x faster (forward and backward) than tokens @ weights.
        weight = self.weight.view(len(KINDS), layers, -1, 2 * d).to(dtype)
        cls_ap = single.reshape(batch, layers, 2, d).permute(2, 1, 3, 0).to(dtype)  # [2, L, D, B]
        pairs = pairs.reshape(batch, layers, 2 * d).permute(1, 2, 0).to(dtype)  # [L, 2D, B]
        cls_ap_logits = weight[:2, ..., :d] @ cls_ap  # the cls and ap heads: their first D columns
        logits = torch.cat([cls_ap_logits, (weight[2] @ pairs)[None]])  # [3, L, G C, B]
        logits = logits.view(self.grid_size, self.num_classes, batch).transpose(1, 2)
        logits = logits.to(x.dtype) + self.bias[:, None, :]
        return (logits, None) if return_attention else logits

    def index(self, kind: str, layer: int, member: int = 0) -> int:
        return (list(KINDS).index(kind) * self.num_layers + layer) * self.members + member

    @torch.no_grad()
    def member(self, kind: str, layer: int, member: int = 0) -> StackedLinearHead:
        """One head as a G=1 linear probe of its kind's inputs (eval mode)."""
        index, width = self.index(kind, layer, member), len(KINDS[kind]) * self.dim
        single = StackedLinearHead(1, width, self.num_classes)
        single.load_state_dict(
            {"weight": self.weight[index : index + 1, :, :width], "bias": self.bias[index : index + 1]}
        )
        return single.eval()


def family_jitter(num_layers: int):
    """The training jitter for `FamilyHead` (`train.train_selected`'s `jitter`): tokens `[b, 2L, D]` -> `[b, 4L, D]`.

    A lone cls or ap probe draws its noise `[n, 1, D]`, a lone cls‖ap probe `[n, 2, D]`, each from a generator of
    the same seed. So the first 2L tokens get one `[n, 1, D]` draw on every token, from the given generator, and the
    last 2L one `[n, 2, D]` draw on every layer's pair, from a twin that starts where the given generator starts and
    then goes its own way (a new twin per call of this function: one per training or scoring run).
    """
    from layerprobe.train import jitter_tokens

    twins: list[torch.Generator] = []

    def jitter(x: torch.Tensor, *, std: float, prob: float, generator: torch.Generator) -> torch.Tensor:
        if not twins:
            twins.append(torch.Generator(device=generator.device).set_state(generator.get_state()))
        single = jitter_tokens(x, std=std, prob=prob, generator=generator, groups=2 * num_layers)
        pairs = jitter_tokens(x, std=std, prob=prob, generator=twins[0], groups=num_layers)
        return torch.cat([single, pairs], dim=1)

    return jitter


@dataclass
class FamilySweep:
    """The family's sweep: every (kind, layer, grid point)'s val scores, each (kind, layer)'s chosen point and the
    refit heads (`FamilyHead` of one member per kind and layer, eval mode) with their history."""

    val_scores: dict[str, list[list[dict]]]  # {kind: [L][G]}
    best_index: dict[str, list[int]]  # {kind: [L]}
    refit: FamilyHead
    history: list[dict]


def sweep_family(
    spec,
    features,
    labels: torch.Tensor,
    *,
    num_train: int,
    num_layers: int,
    num_classes: int,
    grid,
    config,
    seed: int,
) -> FamilySweep:
    """`train.sweep_selected` for every layer's probe of every token kind at once, on the family selection
    `features  # [N, 2L, D]` (rows `:num_train` train, the rest val)."""
    from layerprobe.train import member_scores, predict_selected, train_selected

    def trained(rows, hparams: list, members: int, plan_size: int | None):
        head = FamilyHead(num_layers, members, features.shape[2], num_classes)
        head.reset_parameters(seed=seed)
        return train_selected(
            spec,
            features[rows],
            labels[rows],
            num_classes=num_classes,
            grid=hparams,
            config=config,
            seed=seed,
            plan_size=plan_size,
            head=head,
            jitter=family_jitter(num_layers),
        )

    heads = len(KINDS) * num_layers
    sweep = trained(slice(0, num_train), [h for _ in range(heads) for h in grid], len(grid), len(features))
    predictions, _, _ = predict_selected(
        sweep.probe,
        features[num_train:],
        normalize=spec.normalize,
        jitter_std=config.jitter_std if config.jitter_val else 0.0,
        jitter_prob=config.jitter_prob,
        jitter_seed=seed + 3,  # as train.sweep_selected
        jitter=family_jitter(num_layers),
    )
    truth = labels[num_train:].cpu().numpy()
    val_scores, best_index = {}, {}
    for kind in KINDS:
        val_scores[kind], best_index[kind] = [], []
        for layer in range(num_layers):
            scores = [
                member_scores(hparams, truth, predictions[sweep.probe.index(kind, layer, g)].numpy())
                for g, hparams in enumerate(grid)
            ]
            val_scores[kind].append(scores)
            best_index[kind].append(max(range(len(grid)), key=lambda i: (scores[i]["balanced_accuracy"], -i)))
    refit = trained(slice(None), [grid[i] for kind in KINDS for i in best_index[kind]], 1, None)
    return FamilySweep(val_scores=val_scores, best_index=best_index, refit=refit.probe, history=refit.history)


def select_head(val: dict[str, Sequence[float]], num_layers: int) -> tuple[int, str]:
    """The (layer index, kind) of the best val balanced accuracy `val  # {kind: [L]}`: the first best in layer,
    then kind order (as `layer_report.task_findings` reads the curves)."""
    return max(((i, k) for i in range(num_layers) for k in KINDS), key=lambda ik: val[ik[1]][ik[0]])


def save_family(directory: Path, head: FamilyHead, record: dict) -> None:
    """The refit heads to `directory/per_layer.safetensors` and `record` with their val scores to `per_layer.json`
    (JSON last), through the write path probes take (`checkpoint.save_probe`)."""
    from safetensors.torch import save_file

    from layerprobe.files import replace_durably, tmp_path, write_json

    tensors = {name: value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    weights_tmp = tmp_path(directory / FAMILY_WEIGHTS)
    save_file(tensors, str(weights_tmp))
    replace_durably(weights_tmp, directory / FAMILY_WEIGHTS)
    write_json(directory / FAMILY_CONFIG, record)


def load_family(directory: Path) -> tuple[FamilyHead, dict]:
    """The refit heads (`FamilyHead`, one member per kind and layer, eval mode) and the record `save_family` wrote."""
    from safetensors.torch import load_file

    from layerprobe.files import read_json

    record = read_json(directory / FAMILY_CONFIG)
    tensors = load_file(str(directory / FAMILY_WEIGHTS))
    head = FamilyHead(len(record["layers"]), 1, tensors["weight"].shape[2] // 2, tensors["weight"].shape[1])
    head.load_state_dict(tensors)
    return head.eval(), record


# ---------------------------------------------------------------- the train step


def train_family(
    backbone_name: str,
    dataset_name: str,
    *,
    probe,
    train,
    paths,
    fingerprint,
    reason: str,
    features_hash: str,
) -> dict:
    """The train step (`steps.train.train_step`, which fingerprints it as any probe) for the per-layer family.

    Writes what every train step writes (seed-<s>/ probe.safetensors + probe.json: the selected (layer, kind) as a
    linear probe reading that layer; sweep.json: its grid's val scores; history.json: its refit's curves), every
    layer's and kind's refit heads beside (seed-<s>/per_layer.safetensors + per_layer.json), then train.json last
    (with a `per_layer` record), swapped in whole.
    """
    from layerprobe.checkpoint import save_probe
    from layerprobe.config import FORMATS, HISTORY_FILE, PROBE_CONFIG, PROBE_WEIGHTS, SWEEP_FILE, TRAIN_MARKER
    from layerprobe.device import dtype_name, resolve_device, resolve_matmul_dtype
    from layerprobe.features import read_manifest
    from layerprobe.files import begin_output, swap_in, write_json
    from layerprobe.fingerprint import listed_files, provenance_record
    from layerprobe.probes import ProbeSpec, gather_raw, get_probe_spec, select_token_positions, token_labels
    from layerprobe.selection import PREDICT_ROWS, open_selection
    from layerprobe.train import make_grid

    features_dir = paths.features_dir(backbone_name, dataset_name)
    out_dir = paths.probe_dir(backbone_name, dataset_name, PER_LAYER)
    staging = begin_output(out_dir, fingerprint.value, marker=TRAIN_MARKER)
    spec = get_probe_spec(PER_LAYER, **probe.overrides())
    metadata = read_manifest(features_dir)["provenance"]
    layer_names, token_names = metadata["layer_names"], metadata["token_names"]
    positions = select_token_positions(layer_names, token_names, layers=spec.layers, tokens=("cls", "ap"))
    layers = [li for li, _ in positions[::2]]
    widths = metadata.get("layer_widths")
    width = max(int(w) for w in widths) if widths else None  # every layer at the common width: pad_final true
    selection = open_selection(
        features_dir,
        splits=["train", "val"],
        select=lambda tokens, patches: gather_raw(tokens, positions, width=width),
        batch_rows=lambda counts: max(math.ceil(1.25 * train.batch_size), min(PREDICT_ROWS, counts["val"])),
    )
    num_classes = len(metadata["class_names"])
    grid = make_grid(train.lrs, train.weight_decays)
    device = resolve_device(train.device)
    training = {"device": device.type, "precision": dtype_name(resolve_matmul_dtype(train.precision, device))}
    sweeps = {
        seed: sweep_family(
            spec,
            selection.features,
            selection.labels,
            num_train=selection.counts["train"],
            num_layers=len(layers),
            num_classes=num_classes,
            grid=grid,
            config=train,
            seed=seed,
        )
        for seed in train.seeds
    }

    def chosen_val(sweep: FamilySweep, kind: str) -> list[float]:
        chosen = zip(sweep.val_scores[kind], sweep.best_index[kind], strict=True)
        return [scores[i]["balanced_accuracy"] for scores, i in chosen]

    val = {kind: np.mean([chosen_val(sweeps[s], kind) for s in train.seeds], axis=0).tolist() for kind in KINDS}
    layer, kind = select_head(val, len(layers))
    layer_index = layers[layer]
    record = {
        "layers": [layer_names[li] for li in layers],
        "kinds": list(KINDS),
        "val_balanced_accuracy": val,
        "selected": {"layer": layer_names[layer_index], "kind": kind},
    }
    chosen = ProbeSpec(PER_LAYER, layers=(layer_index,), tokens=KINDS[kind], head="linear", pad_final=True)
    slots = [(layer_index, token_names.index(token)) for token in KINDS[kind]]
    per_seed = []
    for seed in train.seeds:
        sweep = sweeps[seed]
        best = dataclasses.asdict(grid[sweep.best_index[kind][layer]])
        config = {
            "probe": PER_LAYER,
            "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(chosen).items()},
            "best": best,
            "seed": seed,
            "num_classes": num_classes,
            "class_names": metadata["class_names"],
            "token_labels": token_labels(layer_names, token_names, slots),
            "positions": [list(p) for p in slots],
            "width": width,
            "normalize": chosen.normalize,
            "patch_tokens": False,
            "features": {"path": str(features_dir), "content_hash": features_hash},
            "provenance": metadata,
            "training": training,
        }
        staged = staging / f"seed-{seed}"
        save_probe(staged, sweep.refit.member(kind, layer), config)
        write_json(staged / SWEEP_FILE, {"best": best, "configs": sweep.val_scores[kind][layer]})
        at = sweep.refit.index(kind, layer)
        history = [{**h, "loss": [h["loss"][at]], "lr": [h["lr"][at]]} for h in sweep.history]  # its member's, as G=1
        write_json(staged / HISTORY_FILE, history)
        family = {
            **record,
            "positions": [list(p) for p in positions],
            "width": width,
            "seed": seed,
            "val_scores": sweep.val_scores,
            "best": {k: [dataclasses.asdict(grid[i]) for i in chosen] for k, chosen in sweep.best_index.items()},
        }
        save_family(staged, sweep.refit, family)
        seed_dir = paths.seed_dir(backbone_name, dataset_name, PER_LAYER, seed)
        val_selected = chosen_val(sweep, kind)[layer]
        per_seed.append({"seed": seed, "dir": str(seed_dir), "best": best, "val_balanced_accuracy": val_selected})
    names = (PROBE_WEIGHTS, PROBE_CONFIG, SWEEP_FILE, HISTORY_FILE, FAMILY_WEIGHTS, FAMILY_CONFIG)
    summary = {
        "probe": PER_LAYER,
        "seeds": per_seed,
        "features_hash": features_hash,
        "training": training,
        "per_layer": record,
        "format": FORMATS["probes"],
        "files": listed_files(staging, [f"seed-{s}/{n}" for s in train.seeds for n in names]),
        "fingerprint": fingerprint.as_dict(),
        "recorded": provenance_record(),
    }
    write_json(staging / TRAIN_MARKER, summary)
    swap_in(staging, out_dir)
    return {**summary, "status": "computed", "reason": reason}
