"""The all-tokens baseline: the final layer's patch tokens cached on request, `attentive_last_all_tokens` over CLS +
every patch token (normalised per token or across tokens), its save/load round trip and patch-position heatmap; and
CLIP's final layer, read unpadded or padded per probe as the reference does."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from layerprobe.backbone import create_backbone, create_eval_transform
from layerprobe.checkpoint import load_probe, reading_arguments, save_probe
from layerprobe.config import (
    BackboneConfig,
    DatasetConfig,
    EvaluateConfig,
    ExtractConfig,
    PathsConfig,
    PrepareConfig,
    ProbeConfig,
    TrainConfig,
)
from layerprobe.extract import LayerTokenExtractor, extract_features
from layerprobe.features import num_patch_tokens, read_features, read_manifest, read_selection
from layerprobe.metrics import classification_metrics, layer_attention_heatmap, patch_attention_heatmap
from layerprobe.params import load_params
from layerprobe.plots import draw_evaluation, plot_patch_heatmap
from layerprobe.probes import (
    gather_raw,
    gather_tokens,
    get_probe_spec,
    reading_widths,
    select_token_positions,
    token_labels,
)
from layerprobe.train import HParams, predict, predict_selected, train_grid

ROOT = Path(__file__).resolve().parents[1]
F16 = dict(atol=2e-2, rtol=1e-2)  # float16 cache: ~3 significant digits
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)  # 4 x 4 = 16 patches
CLIP = "vit_base_patch32_clip_224"  # OpenAI-CLIP layout (pre-norm, projection head), shrunk below
PROJECTION = 24  # the tiny CLIP's projection width, narrower than its 32-d blocks as 512 is narrower than 768
FAST = TrainConfig(epochs=1, min_steps=150, batch_size=64, device="cpu", precision="float32")


class Images:
    """In-memory ImageSource: seeded random RGB images."""

    def __init__(self, count: int) -> None:
        self.pixels = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        self.labels = (np.arange(count) % 3).astype(np.int64)

    def __len__(self) -> int:
        return len(self.pixels)

    def load_image(self, index: int):
        from PIL import Image

        return Image.fromarray(self.pixels[index])


SPLITS = {"train": np.array([0, 2, 3, 5, 6, 8]), "test": np.array([1, 4, 7])}


def _extract(model, out_dir: Path, **extractor_options) -> Path:
    return extract_features(
        images=Images(9),
        splits=SPLITS,
        extractor=LayerTokenExtractor(model, **extractor_options),
        transform=create_eval_transform(model),
        out_dir=out_dir,
        provenance={"backbone": "tiny"},
        shard_size=4,
        batch_size=4,
        progress=False,
    )


def _pixels(model, indices) -> torch.Tensor:
    transform, images = create_eval_transform(model), Images(9)
    return torch.stack([transform(images.load_image(int(i))) for i in indices])


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize("tap", ["norm2", "block"])
def test_cached_patch_tokens_are_timms_final_patch_tokens(tmp_path, tap):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", model_kwargs={**TINY, "reg_tokens": 2})
    cache = _extract(model, tmp_path, tap=tap, final_patch_tokens=True)
    features = read_features(cache, patches=True)
    with torch.no_grad():
        final = model.forward_features(_pixels(model, features.indices))  # [N, 1 + 2 registers + 16, D]
    assert features.patches.shape == (9, 16, 32) and features.patches.dtype == torch.float16
    assert torch.allclose(features.patches.float(), final[:, 3:], **F16)  # class and register tokens excluded
    # the same token set the cache's final ap is pooled from
    assert torch.allclose(features.tokens[:, -1, 1].float(), final[:, 3:].mean(1), **F16)
    manifest = read_manifest(cache)
    assert manifest["provenance"]["final_patch_tokens"] and manifest["provenance"]["patch_grid"] == [4, 4]
    assert [s["patches"]["file"] for s in manifest["shards"]] == [
        "patches-00000.arrow",
        "patches-00001.arrow",
        "patches-00002.arrow",
    ]
    test = read_features(cache, split="test", patches=True)
    assert torch.equal(test.patches, features.patches[np.isin(features.indices, SPLITS["test"])])


def test_clip_patch_tokens_are_projected_and_stored_at_the_projection_width(tmp_path):
    torch.manual_seed(0)
    model = create_backbone(CLIP, model_kwargs={**TINY, "num_classes": PROJECTION})
    cache = _extract(model, tmp_path, tap="norm2", final_projection=True, final_patch_tokens=True)
    features = read_features(cache, patches=True)
    with torch.no_grad():
        projected = model.head(model.forward_features(_pixels(model, features.indices)))
    assert features.patches.shape == (9, 16, PROJECTION)  # unpadded: no zeros on disk
    assert torch.allclose(features.patches.float(), projected[:, 1:], **F16)


def test_reading_without_patches_never_opens_the_patch_files(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", model_kwargs=TINY)
    cache = _extract(model, tmp_path, final_patch_tokens=True)
    expected = read_features(cache).tokens
    for path in cache.glob("patches-*.arrow"):
        path.write_bytes(b"")  # any read of these would fail
    plain = read_features(cache, split=["train", "test"])
    assert plain.patches is None and torch.equal(plain.tokens, expected)
    with pytest.raises(ValueError, match="patches-00000.arrow changed size"):
        read_features(cache, patches=True)


def test_reading_a_selection_shard_by_shard_equals_gathering_from_the_whole_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_backbone(CLIP, model_kwargs={**TINY, "num_classes": PROJECTION})
    cache = _extract(model, tmp_path, final_projection=True, final_patch_tokens=True)
    assert num_patch_tokens(cache) == 16
    positions = [(2, 0), *[(2, 2 + p) for p in range(16)]]  # final cls + every patch

    def select(tokens, patches):
        return gather_raw(tokens, positions, patches=patches, width=PROJECTION)

    selection = read_selection(cache, splits=["test", "train"], select=select, patches=True)
    assert selection.counts == {"test": 3, "train": 6} and selection.features.shape == (9, 17, PROJECTION)
    for split in ("test", "train"):
        whole = read_features(cache, split=split, patches=True)
        part = selection.features[selection.rows(split)]
        assert part.untyped_storage().data_ptr() == selection.features.untyped_storage().data_ptr()  # a view
        assert torch.equal(part, select(whole.tokens, whole.patches))
        assert torch.equal(selection.labels[selection.rows(split)], whole.labels)

    # A selection larger than the memory available fails at once, in one line naming the cache and both sizes.
    needed = 9 * 17 * PROJECTION * selection.features.element_size()
    monkeypatch.setattr("layerprobe.features.available_host_memory", lambda: needed - 1)
    with pytest.raises(MemoryError) as error:
        read_selection(cache, splits=["test", "train"], select=select, patches=True)
    message = str(error.value)
    assert str(cache) in message and f"need {needed / 1e9:.1f} GB" in message and "\n" not in message
    monkeypatch.setattr("layerprobe.features.available_host_memory", lambda: needed)
    assert read_selection(cache, splits=["test", "train"], select=select, patches=True).features.shape[0] == 9


def test_a_lost_patch_file_recomputes_only_its_shard(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", model_kwargs=TINY)
    cache = _extract(model, tmp_path, final_patch_tokens=True)
    before = read_features(cache, patches=True)
    (cache / "patches-00001.arrow").unlink()
    seen = [0]
    model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__(0, seen[0] + len(o)))
    _extract(model, cache, final_patch_tokens=True)
    assert seen[0] == 4  # shard 1's rows only: shards 0 and 2 and their patch files were kept
    after = read_features(cache, patches=True)
    assert torch.equal(after.patches, before.patches) and torch.equal(after.tokens, before.tokens)


def test_a_cache_without_patch_tokens_names_the_option_to_set(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", model_kwargs=TINY)
    cache = _extract(model, tmp_path)
    assert not list(cache.glob("patches-*"))
    with pytest.raises(ValueError, match=r"set `extract.final_patch_tokens: true`") as error:
        read_features(cache, patches=True)
    assert "\n" not in str(error.value)
    features = read_features(cache)
    spec = get_probe_spec("attentive_last_all_tokens")
    with pytest.raises(ValueError, match=r"set `extract.final_patch_tokens: true`"):
        select_token_positions(features.layer_names, features.token_names, layers=spec.layers, tokens=spec.tokens)


def test_suite_with_the_probe_but_without_the_option_fails_before_extraction():
    from flows.unit import check_patch_tokens  # the unit checks it before its backbone pass

    paper = load_params(ROOT / "params.paper.yaml")
    assert paper.extract.final_patch_tokens and "attentive_last_all_tokens" in paper.suite.probes
    assert (
        get_probe_spec(
            "attentive_last_all_tokens", **paper.probe_config("attentive_last_all_tokens").overrides()
        ).num_heads
        == 8
    )
    check_patch_tokens(paper)
    off = dataclasses.replace(paper, extract=dataclasses.replace(paper.extract, final_patch_tokens=False))
    with pytest.raises(ValueError, match="'attentive_last_all_tokens' .* set `extract.final_patch_tokens: true`"):
        check_patch_tokens(off)
    assert "attentive_last_all_tokens" not in load_params(ROOT / "params.yaml").suite.probes  # time budget


# ------------------------------------------------------------------ the probe on a planted signal

PLANTED = 5  # the one patch position whose token carries the label


def planted_patches(num_images: int, *, seed: int, num_classes: int = 3, patches: int = 16, dim: int = 32):
    """A cache-like set (final layer only) whose label is readable from ONE patch token, position `PLANTED`.

    That patch always carries a marker direction (as a position embedding would) plus a class direction; every other
    patch, the CLS and the ap token are noise, so neither CLS nor ap knows the label.
    """
    generator = torch.Generator().manual_seed(0)  # the same directions for train and test
    marker = 3.0 * torch.randn(dim, generator=generator)
    classes = 3.0 * torch.randn(num_classes, dim, generator=generator)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_images,), generator=generator)
    tokens = torch.randn(num_images, 2, 2, dim, generator=generator)  # [N, L = block0 + final, cls/ap, D]
    grid = torch.randn(num_images, patches, dim, generator=generator)
    grid[:, PLANTED] += marker + classes[labels]
    return tokens.half(), grid.half(), labels


def test_attentive_all_tokens_finds_a_label_that_only_one_patch_carries(tmp_path):
    layers, names = ["block0", "final"], ["cls", "ap"]
    tokens, patches, labels = planted_patches(300, seed=1)
    test_tokens, test_patches, test_labels = planted_patches(150, seed=2)
    scores = {}
    for name in ("attentive_last_all_tokens", "linear_last_cls"):
        spec = get_probe_spec(name)
        positions = select_token_positions(layers, names, layers=spec.layers, tokens=spec.tokens, num_patches=16)
        trained = train_grid(
            spec,
            tokens,
            labels,
            positions=positions,
            num_classes=3,
            grid=[HParams(1e-2, 1e-4)],
            config=FAST,
            patches=patches if spec.reads_patches else None,
        )
        guess, logits, attention = predict(trained.probe, test_tokens, positions=positions, patches=test_patches)
        scores[name] = classification_metrics(test_labels, guess, 3)["accuracy"]
        if name == "attentive_last_all_tokens":
            assert len(positions) == 17 and trained.probe.num_heads == 8  # CLS + 16 patches, the paper's 8 heads
            all_tokens = (trained.probe, positions, logits, attention)
    assert scores["attentive_last_all_tokens"] > 0.9, scores
    assert scores["linear_last_cls"] < 0.5, scores  # chance is 1/3

    probe, positions, logits, attention = all_tokens
    labels_of_slots = token_labels(layers, names, positions)
    assert labels_of_slots[:3] == ["final/cls", "final/patch0", "final/patch1"]
    heatmap = patch_attention_heatmap(attention, labels_of_slots, grid=[4, 4])
    assert heatmap["peak"] == {"patch": PLANTED, "row": 1, "col": 1, "weight": heatmap["weights"][1][1]}
    assert heatmap["weights"][1][1] > 0.5  # most of the attention, where uniform would be 1/17
    assert abs(heatmap["patch_share"] + heatmap["tokens"]["final/cls"] - 1.0) < 1e-6
    png = plot_patch_heatmap(heatmap, tmp_path / "heatmap.png", title="planted")
    assert png.stat().st_size > 5_000
    # the per-layer heatmap still reads these labels (one layer, many tokens) without failing
    assert layer_attention_heatmap(attention, labels_of_slots)["layers"] == ["final"]

    save_probe(
        tmp_path / "probe", probe, {"positions": [list(p) for p in positions], "patch_tokens": True, "width": None}
    )
    loaded, config = load_probe(tmp_path / "probe")
    again, again_logits, again_attention = predict(
        loaded, test_tokens, positions=[tuple(p) for p in config["positions"]], patches=test_patches
    )
    assert torch.equal(again_logits, logits) and torch.equal(again_attention, attention)


def test_gathering_patch_slots_copies_them_in_order_and_in_batches():
    tokens, patches, _ = planted_patches(10, seed=3)
    positions = [(1, 0), *[(1, 2 + p) for p in range(16)], (1, 1)]  # cls, every patch, ap
    out = gather_raw(tokens, positions, patches=patches)
    assert out.shape == (10, 18, 32) and out.dtype == torch.float16
    assert torch.equal(out[:, 0], tokens[:, 1, 0]) and torch.equal(out[:, 17], tokens[:, 1, 1])
    assert torch.equal(out[:, 1:17], patches)
    rows = torch.tensor([7, 2])
    assert torch.equal(gather_raw(tokens, positions, patches=patches, rows=rows), out[rows])
    with pytest.raises(ValueError, match="patch tokens, but none were given"):
        gather_raw(tokens, positions)


@contextlib.contextmanager
def record_head_inputs():
    """Every batch a probe head trains on, as the head receives it (after normalisation and jitter)."""
    seen: list[torch.Tensor] = []

    def record(module, inputs):
        if module.training:
            seen.append(inputs[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def test_the_all_tokens_probe_normalised_across_tokens_trains_and_predicts_as_the_reference(tmp_path):
    layers, names = ["block0", "final"], ["cls", "ap"]
    tokens, patches, labels = planted_patches(60, seed=1)
    spec = get_probe_spec("attentive_last_all_tokens", normalize="across_tokens")
    positions = select_token_positions(layers, names, layers=spec.layers, tokens=spec.tokens, num_patches=16)
    config = dataclasses.replace(FAST, min_steps=4, jitter_prob=0.0)
    with record_head_inputs() as seen:
        trained = train_grid(
            spec,
            tokens,
            labels,
            positions=positions,
            num_classes=3,
            grid=[HParams(1e-2, 1e-4)],
            config=config,
            patches=patches,
        )
    # The reference's all-tokens features [N, T, D] after F.normalize(x, dim=1): every feature has norm 1 over the
    # T = 17 tokens (CLS + 16 patches) of its image.
    assert seen and all(torch.allclose(x.norm(dim=1), torch.ones(x.shape[0], 32), atol=1e-5) for x in seen)
    gathered = gather_tokens(tokens, positions, patches=patches)  # [N, 17, 32]
    reference = gathered / gathered.pow(2).sum(dim=1, keepdim=True).sqrt()
    expected = trained.probe(reference)[0]  # eval mode
    save_probe(
        tmp_path / "probe",
        trained.probe,
        {"positions": [list(p) for p in positions], "width": None, "normalize": spec.normalize},
    )
    loaded, config_saved = load_probe(tmp_path / "probe")
    _, logits, _ = predict(loaded, tokens, patches=patches, **reading_arguments(config_saved))
    assert torch.allclose(logits, expected, atol=1e-5)  # evaluation reads the tokens as training did
    _, per_token, _ = predict_selected(trained.probe, gathered)  # the default: each token over its width
    assert not torch.allclose(per_token[0], expected, atol=1e-3)


# ------------------------------------------------------------------ CLIP's final layer unpadded


def test_clip_final_layer_probes_read_the_projection_width_and_jitter_no_padding(tmp_path):
    torch.manual_seed(0)
    model = create_backbone(CLIP, model_kwargs={**TINY, "num_classes": PROJECTION})
    features = read_features(_extract(model, tmp_path, final_projection=True))
    assert features.metadata["layer_widths"] == [32, 32, PROJECTION] and features.tokens.shape[-1] == 32
    spec = get_probe_spec("linear_last_cls")
    positions = select_token_positions(features.layer_names, features.token_names, layers="last", tokens=["cls"])
    width, token_widths = reading_widths(spec, features.metadata["layer_widths"], positions)
    assert (width, token_widths) == (PROJECTION, None)
    alf_positions = select_token_positions(features.layer_names, features.token_names, layers="all", tokens=["cls"])
    alf_widths = reading_widths(get_probe_spec("alf"), features.metadata["layer_widths"], alf_positions)
    assert alf_widths == (32, None)  # mixed widths: padded as before

    config = dataclasses.replace(FAST, min_steps=6, jitter_prob=1.0)
    with record_head_inputs() as seen:
        trained = train_grid(
            spec,
            features.tokens,
            features.labels,
            positions=positions,
            num_classes=3,
            grid=[HParams(1e-2, 1e-4)],
            config=config,
            width=width,
        )
    assert trained.probe.in_features == PROJECTION  # 24 inputs, none always zero
    assert seen and all(x.shape[-1] == PROJECTION for x in seen)
    unjittered = torch.nn.functional.normalize(features.tokens[:, -1, 0, :PROJECTION].float(), dim=-1)
    assert all((x.norm(dim=-1) - 1).abs().max() > 0.01 for x in seen)  # the jitter lands on the 24 real features
    assert unjittered.norm(dim=-1).allclose(torch.ones(9))


# The reference's width per probe on CLIP, read from its launchers and models config (lciernik/attentive-layer-fusion):
# - attentive probes (scripts/combined_models_evaluation_attn_probe_large_experiments.py, lines 82-92): over CLS/AP
#   keys `dim = max(embedding_dim of the model set)` and `stacked_zero_pad` pads every token to it; the models config
#   (scripts/configs/models_config_single_model_layer_combination.json, lines 606/648/702 and 744/786/840) gives the
#   OpenCLIP `_cls` and `_ap` keys the blocks' width (768, 768, 1024) although their `visual` tokens are the 512/768-d
#   projection: padded. For the all-tokens key `_at` (lines 870/900/930: 512, 512, 768), `dim` is that key's own
#   width and `already_stacked_zero_pad` pads to it: unpadded.
# - linear probes (scripts/combined_models_evaluation_linear_probe_large_experiments.py, line 94): `concat`, every
#   token at its true width, unpadded.
# Here the tiny CLIP's blocks are 32-d (768 there) and its projection 24-d (512 there); `paper` layers: block1 + final.
BLOCK = 32
REFERENCE_INPUTS = {  # probe -> (the head's size attribute, the reference's value)
    "linear_last_cls": ("in_features", PROJECTION),
    "linear_last_ap": ("in_features", PROJECTION),
    "linear_last_cls_ap": ("in_features", 2 * PROJECTION),
    "linear_concat_all": ("in_features", 2 * BLOCK + 2 * PROJECTION),  # block1 cls + ap, final cls + ap, unpadded
    "attentive_last_cls_ap": ("dim", max(BLOCK, BLOCK)),  # embedding_dim of _cls@visual and _ap@visual: padded
    "alf": ("dim", max([BLOCK] * 4)),  # embedding_dim of _cls and _ap at block1 and at visual: the blocks' width
    "attentive_last_all_tokens": ("dim", PROJECTION),  # embedding_dim of _at@visual
}


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_backbone(CLIP, model_kwargs={**TINY, "num_classes": PROJECTION})
    return _extract(model, tmp_path_factory.mktemp("clip"), final_projection=True, final_patch_tokens=True)


@pytest.mark.parametrize("name", list(REFERENCE_INPUTS))
def test_the_paper_preset_gives_each_clip_probe_the_references_width(clip_cache, name, tmp_path):
    paper = load_params(ROOT / "params.paper.yaml")
    assert name in paper.suite.probes or name == "linear_last_ap"  # MAE's baseline, outside the nine's suite
    features = read_features(clip_cache, patches=True)
    spec = get_probe_spec(name, **paper.probe_config(name).overrides())
    positions = select_token_positions(
        features.layer_names, features.token_names, layers=spec.layers, tokens=spec.tokens, num_patches=16
    )
    width, token_widths = reading_widths(spec, features.metadata["layer_widths"], positions)
    config = dataclasses.replace(FAST, min_steps=3, jitter_prob=1.0)
    with record_head_inputs() as seen:
        trained = train_grid(
            spec,
            features.tokens,
            features.labels,
            positions=positions,
            num_classes=3,
            grid=[HParams(1e-2, 1e-4)],
            config=config,
            patches=features.patches,
            width=width,
            token_widths=token_widths,
        )
    attribute, reference = REFERENCE_INPUTS[name]
    assert getattr(trained.probe, attribute) == reference
    final = [k for k, (layer, _) in enumerate(positions) if layer == len(features.layer_names) - 1]
    if spec.head == "attentive" and reference > PROJECTION:  # padded: the jitter lands on the padding too
        assert all(x[:, final, PROJECTION:].abs().amin() > 0 for x in seen)
    if token_widths is not None:  # unpadded concatenation: the padding never reaches the head
        x = seen[0]
        unpadded = torch.cat([x[:, k, :w] for k, w in enumerate(token_widths)], dim=1)
        logits = unpadded @ trained.probe.weight[0].T + trained.probe.bias[0]
        assert torch.allclose(trained.probe(x)[0], logits, atol=1e-5)
        loaded, _ = load_probe(save_probe(tmp_path / "probe", trained.probe, {}))  # the widths travel with the head
        assert loaded.token_widths == token_widths and torch.allclose(loaded(x)[0], logits, atol=1e-5)
    guess, _, _ = predict(trained.probe, features.tokens, positions=positions, patches=features.patches, width=width)
    assert guess.shape == (9,)


def test_on_clip_the_default_reads_opposite_to_the_reference_and_an_attentive_head_cannot_mix_widths(clip_cache):
    features = read_features(clip_cache)
    widths = features.metadata["layer_widths"]

    def read(name: str, **overrides):
        spec = get_probe_spec(name, **overrides)
        positions = select_token_positions(
            features.layer_names, features.token_names, layers=spec.layers, tokens=spec.tokens
        )
        return reading_widths(spec, widths, positions)

    assert read("attentive_last_cls_ap") == (PROJECTION, None)  # ours: the final tokens at their own width
    assert read("attentive_last_cls_ap", pad_final=True) == (BLOCK, None)  # the reference's
    assert read("linear_concat_all") == (BLOCK, None)  # ours: padded, 4 x 32 inputs
    assert read("linear_concat_all", pad_final=False) == (BLOCK, [BLOCK, BLOCK, PROJECTION, PROJECTION])
    assert read("linear_last_cls", pad_final=True) == (BLOCK, None)
    with pytest.raises(ValueError, match=r"probes.alf.pad_final: false .* mixes \[24, 32\]; set true or null"):
        read("alf", pad_final=False)


# ------------------------------------------------------------------ end to end through the steps


def test_a_tiny_suite_with_the_all_tokens_probe_runs_end_to_end(tmp_path):
    from layerprobe.steps.evaluate import evaluate_step, signature_example
    from layerprobe.steps.extract import extract_step
    from layerprobe.steps.prepare import prepare_step
    from layerprobe.steps.train import train_step

    paths = PathsConfig(
        data=str(tmp_path / "data"),
        features=str(tmp_path / "features"),
        probes=str(tmp_path / "probes"),
        results=str(tmp_path / "results"),
    )
    dataset = DatasetConfig(source="count_shapes", options={"num_images": 90, "image_size": 32, "seed": 0})
    prepare_step("count", dataset=dataset, prepare=PrepareConfig(), paths=paths)
    backbone = BackboneConfig(model=CLIP, model_kwargs={**TINY, "num_classes": PROJECTION}, final_projection=True)
    extract = ExtractConfig(batch_size=32, shard_size=40, device="cpu")
    train = dataclasses.replace(FAST, lrs=[1e-2], weight_decays=[1e-4], attn_dropouts=[0.0, 0.1], min_steps=20)
    first = extract_step("clip", "count", backbone=backbone, extract=extract, paths=paths, progress=False)
    with pytest.raises(ValueError, match=r"set `extract.final_patch_tokens: true`") as error:
        train_step("clip", "count", "attentive_last_all_tokens", probe=ProbeConfig(), train=train, paths=paths)
    assert "\n" not in str(error.value)

    extract = dataclasses.replace(extract, final_patch_tokens=True)
    again = extract_step("clip", "count", backbone=backbone, extract=extract, paths=paths, progress=False)
    assert (again["status"], again["reason"]) == ("computed", "params changed")  # turning it on re-extracts
    assert again["content_hash"] != first["content_hash"]
    reused = extract_step("clip", "count", backbone=backbone, extract=extract, paths=paths, progress=False)
    assert reused["status"] == "reused"

    for name in ("linear_last_cls", "attentive_last_all_tokens"):
        train_step("clip", "count", name, probe=ProbeConfig(), train=train, paths=paths)
        result = evaluate_step("clip", "count", name, evaluate=EvaluateConfig(batch_size=16), paths=paths)
        assert 0.0 <= result["test"]["balanced_accuracy"] <= 1.0
        draw_evaluation(result, paths.evaluation_dir("clip", "count", name), title=name)
        probe, config = load_probe(paths.seed_dir("clip", "count", name, 0))
        assert config["width"] == PROJECTION and config["patch_tokens"] == (name != "linear_last_cls")
    assert probe.dim == PROJECTION and probe.num_heads == 8 and len(config["positions"]) == 17
    heatmap_dir = paths.evaluation_dir("clip", "count", "attentive_last_all_tokens")
    heatmap = json.loads((heatmap_dir / "heatmap.json").read_text())
    assert heatmap["kind"] == "patches" and heatmap["grid"] == [4, 4] and list(heatmap["tokens"]) == ["final/cls"]
    assert (heatmap_dir / "heatmap.png").stat().st_size > 5_000
    linear, _ = load_probe(paths.seed_dir("clip", "count", "linear_last_cls", 0))
    assert linear.in_features == PROJECTION

    # the registered-model path: the pyfunc takes the cache's tokens and patches by name, as its signature says
    import mlflow

    example, predictions = signature_example(
        probe_dir=paths.seed_dir("clip", "count", "attentive_last_all_tokens", 0),
        features_dir=paths.features_dir("clip", "count"),
    )
    assert set(example) == {"tokens", "patches"} and example["patches"].shape == (2, 16, PROJECTION)
    model_dir = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=str(ROOT / "src/layerprobe/mlflow_model.py"),
        artifacts={"probe": str(paths.seed_dir("clip", "count", "attentive_last_all_tokens", 0))},
        signature=mlflow.models.infer_signature(example, predictions),
        pip_requirements=["torch"],
    )  # stated: inferring them runs a subprocess
    loaded = mlflow.pyfunc.load_model(str(model_dir))
    assert np.array_equal(loaded.predict(example), predictions)
