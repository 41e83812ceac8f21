"""The per-layer probe family: for every cached layer, a linear probe on its CLS, its AP and CLS‖AP, trained at once.

Per token kind, every (layer l, grid point g) head is one member of one batched problem (`GroupedLinearHead`): member
(l, g) reads layer l's tokens with g's hyperparameters, and all of them train on the same batches of one selection of
the cache (every layer's cls and ap). Each member computes what a `linear` probe with `layers: [l]`, `tokens` = its
kind and `pad_final: true` computes trained alone with the same recipe and seed: same batches, same jitter (the
layers share one draw of it, `train.jitter_tokens`' groups), same initialisation, its own lr and decay. Every layer
is read at the cache's common width, so a narrower final layer (CLIP's projection) is read zero-padded, as with
`pad_final: true`.

Selection is per (layer, kind), on val, as every probe's sweep (ties to the first grid point), and the refit on
train+val trains every layer's chosen member at once. The family's headline probe is the (layer, kind) with the best
val balanced accuracy (mean over seeds; ties to the first in layer, then kind order): it is saved as the standard
probe, a linear probe reading that one layer, so evaluate, the registry and `layerprobe predict` (through the
backbone only as deep as that layer) read it like any other. The stacked refit heads of every layer and kind are
saved beside it (`per_layer.safetensors` + `per_layer.json`) for the curves evaluate writes (`evaluation_block`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from layerprobe.probes import StackedLinearHead, _uniform_

PER_LAYER = "per_layer"
KINDS = {"cls": ("cls",), "ap": ("ap",), "cls_ap": ("cls", "ap")}  # token kind -> the tokens it reads of a layer
FAMILY_WEIGHTS, FAMILY_CONFIG = "per_layer.safetensors", "per_layer.json"


class GroupedLinearHead(nn.Module):
    """`groups` x `members` linear probes, member (l, g) (index l * members + g) reading input group l only:
    tokens `[B, groups * k, D]` (group l = tokens l*k .. l*k+k-1, concatenated) -> logits `[groups * members, B, C]`.

    Every member is initialised as a G=1 `StackedLinearHead` of `k * D` inputs with the same seed.
    """

    def __init__(self, groups: int, members: int, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.groups, self.members, self.in_features, self.num_classes = groups, members, in_features, num_classes
        self.grid_size = groups * members
        self.weight = nn.Parameter(torch.empty(self.grid_size, num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(self.grid_size, num_classes))
        self.matmul_dtype = torch.float32  # see `probes.set_matmul_dtype`
        self.reset_parameters(seed=0)

    @torch.no_grad()
    def reset_parameters(self, *, seed: int) -> None:
        """Every member as `StackedLinearHead.reset_parameters(seed=seed)` initialises its members."""
        generator = torch.Generator().manual_seed(seed)
        weight, bias = torch.empty(self.num_classes, self.in_features), torch.empty(self.num_classes)
        _uniform_(weight, self.in_features, generator)
        _uniform_(bias, self.in_features, generator)
        self.weight.copy_(weight.expand_as(self.weight))
        self.bias.copy_(bias.expand_as(self.bias))

    def forward(
        self, x: torch.Tensor, *, return_attention: bool = False, dropout_noise: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, None]:
        flat = x.reshape(x.shape[0], self.groups, -1)  # [B, L, k*D]: a layer's tokens ordered as a linear probe's
        if flat.shape[2] != self.in_features:
            raise ValueError(f"per-layer head expects {self.in_features} features per layer, got {flat.shape[2]}")
        weight = self.weight.view(self.groups, self.members, self.num_classes, -1).to(self.matmul_dtype)
        logits = torch.einsum("blf,lgcf->lgbc", flat.to(self.matmul_dtype), weight)
        logits = logits.reshape(self.grid_size, x.shape[0], self.num_classes)
        logits = logits.to(x.dtype) + self.bias[:, None, :]
        return (logits, None) if return_attention else logits

    @torch.no_grad()
    def member(self, index: int) -> StackedLinearHead:
        """Member `index` as a G=1 linear probe (eval mode)."""
        single = StackedLinearHead(1, self.in_features, self.num_classes)
        single.load_state_dict({"weight": self.weight[index : index + 1], "bias": self.bias[index : index + 1]})
        return single.eval()


class _Kind:
    """One token kind's columns of a family selection `[N, 2L, D]` (cls@l, ap@l, ...): `[N, L * k, D]`, for a tensor
    or a selection left in its cache (`train.StreamedRows`), whose rows are read whole and then picked from."""

    def __init__(self, selection, picks: Sequence[int]) -> None:
        self._selection, self._picks = selection, torch.tensor(list(picks))
        self.shape = torch.Size([selection.shape[0], len(picks), *selection.shape[2:]])
        self.device = selection.device

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> _Kind:
        return _Kind(self._selection[rows], self._picks.tolist())

    def read(self, rows) -> torch.Tensor:
        from layerprobe.train import read_rows

        tokens = read_rows(self._selection, rows)
        return tokens[:, self._picks.to(tokens.device)]


def kind_view(selection, kind: str, num_layers: int):
    """Kind `kind`'s tokens of a family selection `[N, 2L, D]`: a tensor view `[N, L * k, D]`, or a `_Kind`."""
    picks = [2 * layer + ["cls", "ap"].index(token) for layer in range(num_layers) for token in KINDS[kind]]
    if isinstance(selection, torch.Tensor):  # views: cls@l at 2l, ap@l at 2l + 1
        return {"cls": selection[:, 0::2], "ap": selection[:, 1::2], "cls_ap": selection}[kind]
    return _Kind(selection, picks)


@dataclass
class KindSweep:
    """One token kind's sweep: every (layer, grid point)'s val scores, each layer's chosen point and the refit heads
    (`GroupedLinearHead` of one member per layer, eval mode) with their history."""

    val_scores: list[list[dict]]  # [L][G]
    best_index: list[int]  # [L]
    refit: GroupedLinearHead
    history: list[dict]


def sweep_kind(
    spec,
    features,
    labels: torch.Tensor,
    *,
    num_train: int,
    num_layers: int,
    kind: str,
    num_classes: int,
    grid,
    config,
    seed: int,
) -> KindSweep:
    """`train.sweep_selected` for every layer's probe of one token kind at once, on the family selection
    `features  # [N, 2L, D]` (rows `:num_train` train, the rest val)."""
    from layerprobe.train import predict_selected, train_selected

    tokens = kind_view(features, kind, num_layers)
    width = len(KINDS[kind]) * features.shape[2]

    def trained(rows, hparams: list, members: int, plan_size: int | None):
        head = GroupedLinearHead(num_layers, members, width, num_classes)
        head.reset_parameters(seed=seed)
        return train_selected(
            spec,
            tokens[rows],
            labels[rows],
            num_classes=num_classes,
            grid=hparams,
            config=config,
            seed=seed,
            plan_size=plan_size,
            head=head,
            jitter_groups=num_layers,
        )

    sweep = trained(slice(0, num_train), [h for _ in range(num_layers) for h in grid], len(grid), len(features))
    predictions, _, _ = predict_selected(
        sweep.probe,
        tokens[num_train:],
        normalize=spec.normalize,
        jitter_std=config.jitter_std if config.jitter_val else 0.0,
        jitter_prob=config.jitter_prob,
        jitter_seed=seed + 3,  # as train.sweep_selected
        jitter_groups=num_layers,
    )
    truth = labels[num_train:].cpu().numpy()
    val_scores, best_index = [], []
    for layer in range(num_layers):
        scores = []
        for g, hparams in enumerate(grid):
            guess = predictions[layer * len(grid) + g].numpy()
            scores.append(
                {
                    "name": hparams.name,
                    "lr": hparams.lr,
                    "weight_decay": hparams.weight_decay,
                    "attn_dropout": hparams.attn_dropout,
                    "balanced_accuracy": float(balanced_accuracy_score(truth, guess)),
                    "accuracy": float((guess == truth).mean()),
                }
            )
        val_scores.append(scores)
        best_index.append(max(range(len(grid)), key=lambda i: (scores[i]["balanced_accuracy"], -i)))
    refit = trained(slice(None), [grid[i] for i in best_index], 1, None)
    return KindSweep(val_scores=val_scores, best_index=best_index, refit=refit.probe, history=refit.history)


def select_head(val: dict[str, Sequence[float]], num_layers: int) -> tuple[int, str]:
    """The (layer index, kind) of the best val balanced accuracy `val  # {kind: [L]}`: the first best in layer,
    then kind order (as `layer_report.task_findings` reads the curves)."""
    return max(((i, k) for i in range(num_layers) for k in KINDS), key=lambda ik: val[ik[1]][ik[0]])


def save_family(directory: Path, sweeps: dict[str, KindSweep], record: dict) -> None:
    """Every kind's refit heads to `directory/per_layer.safetensors` and `record` with their shapes and val scores
    to `per_layer.json` (JSON last), through the write path probes take (`checkpoint.save_probe`)."""
    from safetensors.torch import save_file

    from layerprobe.files import replace_durably, tmp_path, write_json

    tensors = {}
    for kind, sweep in sweeps.items():
        tensors[f"{kind}.weight"] = sweep.refit.weight.detach().cpu().contiguous()
        tensors[f"{kind}.bias"] = sweep.refit.bias.detach().cpu().contiguous()
    weights_tmp = tmp_path(directory / FAMILY_WEIGHTS)
    save_file(tensors, str(weights_tmp))
    replace_durably(weights_tmp, directory / FAMILY_WEIGHTS)
    write_json(directory / FAMILY_CONFIG, record)


def load_family(directory: Path) -> tuple[dict[str, GroupedLinearHead], dict]:
    """The refit heads {kind: `GroupedLinearHead`} (eval mode) and the record `save_family` wrote."""
    from safetensors.torch import load_file

    from layerprobe.files import read_json

    record = read_json(directory / FAMILY_CONFIG)
    tensors = load_file(str(directory / FAMILY_WEIGHTS))
    heads = {}
    for kind in record["kinds"]:
        weight = tensors[f"{kind}.weight"]
        head = GroupedLinearHead(len(record["layers"]), 1, weight.shape[2], weight.shape[1])
        head.load_state_dict({"weight": weight, "bias": tensors[f"{kind}.bias"]})
        heads[kind] = head.eval()
    return heads, record


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
        seed: {
            kind: sweep_kind(
                spec,
                selection.features,
                selection.labels,
                num_train=selection.counts["train"],
                num_layers=len(layers),
                kind=kind,
                num_classes=num_classes,
                grid=grid,
                config=train,
                seed=seed,
            )
            for kind in KINDS
        }
        for seed in train.seeds
    }

    def chosen_val(sweep: KindSweep) -> list[float]:
        return [scores[i]["balanced_accuracy"] for scores, i in zip(sweep.val_scores, sweep.best_index, strict=True)]

    val = {kind: np.mean([chosen_val(sweeps[s][kind]) for s in train.seeds], axis=0).tolist() for kind in KINDS}
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
        sweep = sweeps[seed][kind]
        best = dataclasses.asdict(grid[sweep.best_index[layer]])
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
        save_probe(staged, sweep.refit.member(layer), config)
        write_json(staged / SWEEP_FILE, {"best": best, "configs": sweep.val_scores[layer]})
        history = [{**h, "loss": h["loss"][layer], "lr": h["lr"][layer]} for h in sweep.history]  # its member's
        write_json(staged / HISTORY_FILE, history)
        family = {
            **record,
            "positions": [list(p) for p in positions],
            "width": width,
            "seed": seed,
            "val_scores": {k: s.val_scores for k, s in sweeps[seed].items()},
            "best": {k: [dataclasses.asdict(grid[i]) for i in s.best_index] for k, s in sweeps[seed].items()},
        }
        save_family(staged, sweeps[seed], family)
        seed_dir = paths.seed_dir(backbone_name, dataset_name, PER_LAYER, seed)
        val_selected = chosen_val(sweep)[layer]
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
