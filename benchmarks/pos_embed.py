"""How far timm's and DINOv2's resampling of the DINOv2 position table (37x37 at 518 px → 16x16 at 224 px) differ.

What: timm resamples the table once at load (bicubic, antialiased, size=16); DINOv2's own code interpolates it at
every forward (bicubic, no antialias, scale_factor=(16 + 0.1) / 37); `pos_embed_resample: dinov2` does the latter
once at load (`layerprobe.backbone.resample_pos_embed_dinov2`). On random weights (no hub), this prints
  1. the tables' max / mean absolute difference relative to the table's std, for an i.i.d. table (timm's init,
     N(0, 0.02)) and a smooth one (bicubic upsampling of 6x6 noise, as trained tables are smooth);
  2. the effect on a random DINOv2-shaped ViT-S/14 (depth 4, layer scale 1) loaded both ways from one 518-px
     checkpoint: per layer, 1 - the mean cosine similarity of the cls and ap (mean patch) tokens at tap norm2 over
     random 224-px images, with both tables at init scale (std 0.02) and the smooth one at the patch tokens' scale
     (position as loud as content).
How:  python benchmarks/pos_embed.py [--depth 4 --images 16 --seed 0]
Cost: about 20 s on 2 CPU cores (mostly imports and building the 518-px model).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from layerprobe.backbone import create_backbone, resample_pos_embed_dinov2
from layerprobe.extract import LayerTokenExtractor

MODEL = "vit_small_patch14_dinov2"


def model_kwargs(depth: int) -> dict:
    # Layer scale 1 (DINOv2's own hub default; trained gammas are far from timm's init of 1e-5): at 1e-5 a random
    # block barely touches the residual stream, and every layer would just repeat the embeddings.
    return {"depth": depth, "init_values": 1.0}


def smooth_table(dim: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """A [1, 1 + 37*37, dim] table whose grid part varies slowly in space, scaled to `std`."""
    coarse = torch.randn(1, dim, 6, 6, generator=generator)
    grid = F.interpolate(coarse, size=(37, 37), mode="bicubic").flatten(2).mT
    grid = grid * (std / grid.std())
    return torch.cat([torch.randn(1, 1, dim, generator=generator) * std, grid], dim=1)


def table_difference(table: torch.Tensor) -> tuple[float, float]:
    ours = resample_pos_embed_dinov2(table, (16, 16))
    timms = resample_abs_pos_embed(table, new_size=[16, 16], num_prefix_tokens=1)  # timm's load-time defaults
    difference = (ours - timms)[:, 1:].abs() / table[:, 1:].std()
    return float(difference.max()), float(difference.mean())


def token_dissimilarity(
    table: torch.Tensor, *, depth: int, images: torch.Tensor, seed: int
) -> list[tuple[float, float]]:
    """Per layer (blocks, then final): 1 - mean cosine similarity of cls and of ap tokens, timm vs DINOv2 resampling."""
    torch.manual_seed(seed)
    source = timm.create_model(MODEL, pretrained=False, img_size=518, **model_kwargs(depth))
    with torch.no_grad():
        source.pos_embed.copy_(table)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dinov2.safetensors"
        safetensors.torch.save_file(source.state_dict(), str(path))
        tokens = {}
        for rule in ("timm", "dinov2"):
            model = create_backbone(
                MODEL, checkpoint=path, model_kwargs={**model_kwargs(depth), "img_size": 224}, pos_embed_resample=rule
            )
            with torch.inference_mode():
                tokens[rule] = LayerTokenExtractor(model, tap="norm2")(images)  # [N, L, 2, D]
    cosine = F.cosine_similarity(tokens["timm"], tokens["dinov2"], dim=-1).mean(0)  # [L, 2]
    return [(1 - float(c), 1 - float(a)) for c, a in cosine]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    dim = 384

    print("1. table 37x37 -> 16x16: |dinov2 - timm| / std(table)")
    iid = torch.randn(1, 1 + 37 * 37, dim, generator=generator) * 0.02
    for name, table in (("iid (timm init)", iid), ("smooth", smooth_table(dim, 0.02, generator))):
        largest, mean = table_difference(table)
        print(f"   {name:<16} max {largest:.3f}  mean {mean:.3f}")

    images = torch.randn(args.images, 3, 224, 224, generator=generator)
    probe = timm.create_model(MODEL, pretrained=False, img_size=224, **model_kwargs(1))
    with torch.inference_mode():
        patch_std = float(probe.patch_embed(images).std())
    print(f"2. random ViT-S/14 depth {args.depth}, {args.images} images: 1 - cosine(timm, dinov2), cls / ap per layer")
    tables = {
        "iid, std 0.02": iid,
        "smooth, std 0.02": smooth_table(dim, 0.02, generator),
        f"smooth, std {patch_std:.2f}": smooth_table(dim, patch_std, generator),
    }
    for name, table in tables.items():
        similarity = token_dissimilarity(table, depth=args.depth, images=images, seed=args.seed)
        layers = "  ".join(f"{c:.1e}/{a:.1e}" for c, a in similarity)
        print(f"   {name:<18} {layers}   (largest {max(max(pair) for pair in similarity):.1e})")


if __name__ == "__main__":
    main()
