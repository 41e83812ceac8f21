"""Extraction: cached tokens are the model's own, and the cache resumes, invalidates and fails safely."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import layerprobe.extract as extract_module
from layerprobe.backbone import create_backbone, create_eval_transform
from layerprobe.data import ImageFileError
from layerprobe.extract import LayerTokenExtractor, extract_features
from layerprobe.features import cache_content_hash, read_features, read_manifest
from layerprobe.files import tmp_path as tmp_path_of

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3)
F16 = dict(atol=2e-2, rtol=1e-2)  # float16 cache: ~3 significant digits


class TinyImages:
    """In-memory ImageSource: seeded random RGB images; index `bad` fails like a corrupt file."""

    def __init__(self, count: int, *, bad: int | None = None) -> None:
        rng = np.random.default_rng(0)
        self.pixels = rng.integers(0, 256, (count, 40, 36, 3), dtype=np.uint8)
        self.labels = (np.arange(count) % 3).astype(np.int64)
        self.bad = bad

    def __len__(self) -> int:
        return len(self.pixels)

    def load_image(self, index: int) -> Image.Image:
        if index == self.bad:
            raise OSError(f"cannot identify image file 'images/{index:05d}.png'")
        return Image.fromarray(self.pixels[index])


SPLITS = {"train": np.array([0, 2, 3, 5, 6, 8, 9]), "test": np.array([1, 4, 7])}


def _model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(NAME, model_kwargs={**TINY, **overrides})


def _extract(model, out_dir, *, tap="norm2", images=None, provenance=None, **kwargs):
    return extract_features(
        images=images or TinyImages(10),
        splits=SPLITS,
        extractor=kwargs.pop("extractor", None) or LayerTokenExtractor(model, tap=tap),
        transform=create_eval_transform(model),
        out_dir=out_dir,
        provenance=provenance or {"backbone": NAME},
        shard_size=kwargs.pop("shard_size", 3),
        batch_size=kwargs.pop("batch_size", 4),
        progress=False,
        **kwargs,
    )


def _inputs(model, indices) -> torch.Tensor:
    transform, images = create_eval_transform(model), TinyImages(10)
    return torch.stack([transform(images.load_image(int(i))) for i in indices])


def _count_images(model) -> list[int]:
    """Images entering the backbone, counted at the patch embedding (independent of the extraction code)."""
    seen = [0]
    model.patch_embed.register_forward_hook(lambda module, inputs, output: seen.__setitem__(0, seen[0] + len(output)))
    return seen


def test_block_tap_equals_forward_intermediates_and_forward_features(tmp_path):
    model = _model()
    features = read_features(_extract(model, tmp_path, tap="block"))
    x = _inputs(model, features.indices)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, return_prefix_tokens=True, output_fmt="NLC")
        reference = model.forward_features(x)
    assert features.layer_names == ["block0", "block1", "block2", "final"]
    assert torch.allclose(final, reference)
    cached = features.tokens.float()
    assert torch.allclose(cached[:, -1, 0], reference[:, 0], **F16)
    assert torch.allclose(cached[:, -1, 1], reference[:, 1:].mean(1), **F16)
    for i, (patches, prefix) in enumerate(intermediates):
        assert torch.allclose(cached[:, i, 0], prefix[:, 0], **F16)
        assert torch.allclose(cached[:, i, 1], patches.mean(1), **F16)
    assert read_manifest(tmp_path)["provenance"]["tap"] == "block"


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_norm2_tap_equals_independent_hooks(tmp_path, reg_tokens):
    model = _model(reg_tokens=reg_tokens)
    assert model.num_prefix_tokens == 1 + reg_tokens
    features = read_features(_extract(model, tmp_path, tap="norm2"))
    seen: list[torch.Tensor] = []
    handles = [b.norm2.register_forward_hook(lambda m, i, o: seen.append(o.clone())) for b in model.blocks]
    x = _inputs(model, features.indices)
    with torch.no_grad():
        reference = model.forward_features(x)
    for handle in handles:
        handle.remove()
    cached = features.tokens.float()
    assert len(seen) == len(model.blocks) == cached.shape[1] - 1
    for i, tokens in enumerate(seen):
        patches = tokens[:, 1 + reg_tokens :]
        assert patches.shape[1] == 16  # (32 / 8) ** 2 patch tokens, prefix excluded
        assert torch.allclose(cached[:, i, 0], tokens[:, 0], **F16)
        assert torch.allclose(cached[:, i, 1], patches.mean(1), **F16)
        if reg_tokens:  # the register tokens would move the mean if they were included
            assert not torch.allclose(cached[:, i, 1], tokens[:, 1:].mean(1), **F16)
    assert torch.allclose(cached[:, -1, 0], reference[:, 0], **F16)


def test_final_projection_applies_the_head_and_pads(tmp_path):
    model = _model(num_classes=24)
    extractor = LayerTokenExtractor(model, tap="block", final_projection=True)
    assert extractor.layer_widths == [48, 48, 48, 24] and extractor.dim == 48
    features = read_features(_extract(model, tmp_path, extractor=extractor))
    x = _inputs(model, features.indices)
    with torch.no_grad():
        tokens = model.forward_features(x)
        projected = model.head(tokens)  # every final token projected, then pooled
    cached = features.tokens.float()
    assert torch.allclose(cached[:, -1, 0, :24], projected[:, 0], **F16)
    assert torch.allclose(cached[:, -1, 1, :24], projected[:, 1:].mean(1), **F16)
    assert torch.count_nonzero(cached[:, -1, :, 24:]) == 0
    assert features.metadata["layer_widths"] == [48, 48, 48, 24] and features.metadata["final_projection"]


def test_model_without_class_token_is_rejected_by_name():
    model = timm.create_model(NAME, pretrained=False, class_token=False, global_pool="avg", **TINY)
    with pytest.raises(ValueError, match="'vit_tiny_patch16_224' has no class token"):
        LayerTokenExtractor(model)


def test_out_of_memory_halves_the_batch_and_retries(tmp_path):
    model = _model()
    sizes: list[int] = []
    forward_features = model.forward_features

    def flaky(x):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward_features(x)

    model.forward_features = flaky
    reference_dir = tmp_path / "reference"
    _extract(_model(), reference_dir)
    _extract(model, tmp_path / "retried", batch_size=4)
    assert sizes[:3] == [4, 2, 2] and max(sizes[3:]) <= 2  # halved once, then kept small
    assert torch.equal(read_features(tmp_path / "retried").tokens, read_features(reference_dir).tokens)


def staged(out_dir) -> list:
    """The staging folders beside `out_dir` (`layerprobe.files.begin_output`): where a cache is written until whole."""
    return sorted(out_dir.parent.glob(f".{out_dir.name}.staging-*.tmp"))


def test_resume_skips_finished_shards(tmp_path, monkeypatch):
    model = _model()
    reference = cache_content_hash(_extract(model, tmp_path / "uninterrupted"))

    out_dir = tmp_path / "killed"
    real_write_shard, written = extract_module.write_shard, []

    def dies_after_two(path, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process is killed while shard 3 is being computed
        written.append(path.name)
        return real_write_shard(path, **kwargs)

    monkeypatch.setattr(extract_module, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _extract(model, out_dir)
    monkeypatch.undo()
    assert not out_dir.exists()  # nothing half-made where the cache goes
    assert written == ["shard-00000.arrow", "shard-00001.arrow"]
    (staging,) = staged(out_dir)
    left = tmp_path_of(staging / "shard-00002.arrow")
    left.write_bytes(b"half-written")  # what a kill during a write leaves
    before = {name: (staging / name).stat() for name in written}

    seen = _count_images(model)
    _extract(model, out_dir)
    assert seen[0] == 10 - 6  # only the rows of the two unfinished shards went through the model
    for name, stat in before.items():
        after = (out_dir / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    # The staging folder is this extraction's own (its writers hold the cache's lock): its dead writer's temporary
    # went with it, and nothing of it is left beside the cache.
    assert not left.exists() and not staged(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["manifest.json", *(f"shard-0000{i}.arrow" for i in range(4))]
    assert cache_content_hash(out_dir) == reference
    assert torch.equal(read_features(out_dir).tokens, read_features(tmp_path / "uninterrupted").tokens)


def test_complete_cache_rerun_does_no_work(tmp_path):
    model, out_dir = _model(), tmp_path / "cache"
    _extract(model, out_dir)
    stats = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    seen = _count_images(model)
    _extract(model, out_dir)
    assert seen[0] == 0
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stats


def test_changed_provenance_recomputes_every_shard_beside_the_old_cache(tmp_path, monkeypatch):
    model, out_dir = _model(), tmp_path / "cache"
    _extract(model, out_dir, tap="norm2")
    old_hash, old_tokens = cache_content_hash(out_dir), read_features(out_dir).tokens
    seen = _count_images(model)
    real_write_shard = extract_module.write_shard

    def checks_the_old_cache(path, **kwargs):  # while the new cache is written, the old one is whole and readable
        assert cache_content_hash(out_dir) == old_hash and torch.equal(read_features(out_dir).tokens, old_tokens)
        return real_write_shard(path, **kwargs)

    monkeypatch.setattr(extract_module, "write_shard", checks_the_old_cache)
    _extract(model, out_dir, tap="block")
    monkeypatch.undo()
    assert seen[0] == 10
    manifest = read_manifest(out_dir)
    assert manifest["provenance"]["tap"] == "block" and cache_content_hash(out_dir) != old_hash
    _extract(model, out_dir, tap="block", provenance={"backbone": NAME, "weights": "other"})  # complete, but stale
    assert seen[0] == 20
    assert read_features(out_dir).metadata["weights"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no staging or old cache left beside it


def test_changed_shard_size_drops_extra_shards(tmp_path):
    model, out_dir = _model(), tmp_path / "cache"
    _extract(model, out_dir, shard_size=3)
    _extract(model, out_dir, shard_size=5)
    assert sorted(p.name for p in out_dir.glob("shard-*")) == ["shard-00000.arrow", "shard-00001.arrow"]
    assert len(read_features(out_dir).tokens) == 10


def test_bad_image_is_named_and_finished_shards_stay(tmp_path):
    model, out_dir = _model(), tmp_path / "cache"
    with pytest.raises(OSError, match="images/00007.png"):
        _extract(model, out_dir, images=TinyImages(10, bad=7), batch_size=1)
    assert not out_dir.exists()
    assert sorted(p.name for p in staged(out_dir)[0].iterdir()) == ["shard-00000.arrow", "shard-00001.arrow"]
    seen = _count_images(model)
    _extract(model, out_dir)  # the file was fixed: only the unfinished shards run
    assert seen[0] == 4 and len(read_features(out_dir).tokens) == 10


def test_a_folder_of_other_files_is_refused_untouched(tmp_path):
    out_dir = tmp_path / "train"
    out_dir.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):  # webdataset's ShardWriter names
        (out_dir / name).write_bytes(name.encode())
    with pytest.raises(ValueError, match=r"train holds files that are not a layerprobe output \(shard-000000.tar"):
        _extract(_model(), out_dir)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "train",
        "train/shard-000000.tar",
        "train/shard-000001.tar",
    ]
    assert all(path.read_bytes() == path.name.encode() for path in out_dir.iterdir())


class HostileImages(TinyImages):
    def load_image(self, index: int) -> Image.Image:
        if index == self.bad:
            raise ImageFileError(f"images/{index:05d}.png: declares 20000x20000 = 400,000,000 pixels, over the cap")
        return super().load_image(index)


def test_a_bad_image_in_a_worker_process_is_the_workers_one_line_error(tmp_path):
    with pytest.raises(ImageFileError) as excinfo:
        _extract(_model(), tmp_path, images=HostileImages(10, bad=7), batch_size=1, num_workers=1)
    assert str(excinfo.value) == "images/00007.png: declares 20000x20000 = 400,000,000 pixels, over the cap"


def test_bad_input_leaves_out_dir_untouched(tmp_path):
    out_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match="vit_tiny_patch16_22"):
        _extract(create_backbone("vit_tiny_patch16_22", model_kwargs=TINY), out_dir)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        _extract(create_backbone(NAME, checkpoint=tmp_path / "nope.safetensors", model_kwargs=TINY), out_dir)
    with pytest.raises(ValueError, match="float8"):
        _extract(_model(), out_dir, dtype="float8")
    with pytest.raises(ValueError, match="index 10 is outside"):
        extract_features(
            images=TinyImages(10),
            splits={"train": np.array([3, 10])},
            extractor=LayerTokenExtractor(_model()),
            transform=create_eval_transform(_model()),
            out_dir=out_dir,
            provenance={},
            progress=False,
        )
    assert not out_dir.exists()
