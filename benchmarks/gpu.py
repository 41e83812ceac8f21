"""The GPU check: every figure the project still lacks from a GPU, in one command, appended to benchmarks/RESULTS.md.

What, in order (each section's output is kept verbatim):
  1. extraction vs a bare timm forward: `benchmarks/extract.py`, ViT-B/16 at 224 px, bfloat16, batch 256, 10,000
     images (target: extraction >= 0.9 of the bare forward's images/s);
  2. probe steps at the paper's shapes, batch 2048, the paper's 63-member grid (3 lr x 7 wd x 3 dropouts), float32
     as the paper preset trains: alf on ViT-B/16 tokens (24 x 768, 24 heads), alf on ViT-L/14 tokens (48 x 1024, 48
     heads) and the all-tokens probe on ViT-B/16 (CLS + 196 patches, 768, 8 heads); each grid step of the training
     code (`train.train_selected`) against the reference's way, one member at a time in the straightforward form
     (per-token K/V, `probes.ReferenceAttentiveHead`, AdamW), i.e. 63 of its steps;
  3. `layerprobe plan --device cuda` for the paper's suite (params.paper.yaml), which writes its calibration file
     (`calibration-cuda.json` beside the section: a CPU-only head node prices the study from it with
     `layerprobe plan --params params.paper.yaml --calibration calibration-cuda.json`);
  4. two process workers on one GPU: the same alf grid training in two processes at once against one alone.
How:  python benchmarks/gpu.py [--out DIR]                 (on a GPU machine; under 8 minutes on one H100-class GPU)
      python benchmarks/gpu.py --device cpu --quick        (every section at tiny sizes, under a minute: a dry run)
Writes the section to --results (default benchmarks/RESULTS.md; with --quick only when given) and, with --out, the
section, the calibration file and plan's output there too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_GRID = {
    "lrs": [1e-1, 1e-2, 1e-3],
    "weight_decays": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0],
    "attn_dropouts": [0.0, 0.1, 0.3],
}
# (name, tokens K, width D, heads H): the paper's probe shapes; quick mode shrinks them.
SHAPES = [("alf on ViT-B/16", 24, 768, 24), ("alf on ViT-L/14", 48, 1024, 48), ("all tokens on ViT-B/16", 197, 768, 8)]
QUICK_SHAPES = [("alf, tiny", 12, 32, 12), ("all tokens, tiny", 17, 32, 8)]


def environment() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def run(command: list[str], *, timeout: float, cwd: Path = ROOT) -> str:
    """A section's command: its output, and its exit status in words when it failed or ran out of time (a section
    that fails does not stop the others; `plan` exits 2 after printing everything when the disk is too small)."""
    try:
        done = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
        return f"{output.strip()}\n(stopped after {timeout:.0f} s; what it measured is kept: run it again to finish)"
    if done.returncode:
        return f"{done.stdout.strip()}\n(exit {done.returncode}) {done.stderr.strip()[-1500:]}"
    return done.stdout.strip()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grid_step_seconds(tokens: int, width: int, heads: int, *, batch: int, grid: list, device, steps: int) -> float:
    """Median seconds of one optimisation step of the training code's grid (`train.train_selected`) at this shape."""
    import torch

    from layerprobe.config import TrainConfig
    from layerprobe.probes import ProbeSpec
    from layerprobe.train import train_selected

    features = torch.randn((2 * batch, tokens, width), device=device).half()
    labels = torch.arange(2 * batch, device=device) % 100
    config = TrainConfig(
        epochs=1, min_steps=steps + 1, batch_size=batch, min_batches=1, device=str(device), precision="float32"
    )
    marks = []

    def on_step(step: int) -> None:
        synchronize(device)
        marks.append(time.perf_counter())

    spec = ProbeSpec("alf", layers="last", tokens=("cls",), head="attentive", num_heads=heads)
    train_selected(spec, features, labels, num_classes=100, grid=grid, config=config, on_step=on_step)
    return statistics.median(b - a for a, b in zip(marks, marks[1:], strict=False))


def reference_step_seconds(tokens: int, width: int, heads: int, *, batch: int, device, steps: int) -> float:
    """Median seconds of one step of one member in the straightforward form (per-token K/V projections, as the
    reference code computes it), with AdamW and gradient clipping, as the reference trains each config alone."""
    import torch
    import torch.nn.functional as F

    from layerprobe.probes import ReferenceAttentiveHead

    torch.manual_seed(0)
    head = ReferenceAttentiveHead(width, heads, 100, attn_dropout=0.1).to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.nn.functional.normalize(torch.randn((batch, tokens, width), device=device), dim=-1)
    labels = torch.arange(batch, device=device) % 100
    times = []
    for _ in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        loss = F.cross_entropy(head(x), labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 5.0)
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def probe_steps(device, *, quick: bool) -> str:
    from layerprobe.train import make_grid

    grid = make_grid(**PAPER_GRID) if not quick else make_grid([1e-2, 1e-3], [1e-4], [0.0, 0.1])
    batch, steps = (32, 2) if quick else (2048, 5)
    lines = [f"batch {batch}, grid of {len(grid)} members, float32, {device}"]
    for name, tokens, width, heads in QUICK_SHAPES if quick else SHAPES:
        ours = grid_step_seconds(tokens, width, heads, batch=batch, grid=grid, device=device, steps=steps)
        one = reference_step_seconds(tokens, width, heads, batch=batch, device=device, steps=steps)
        lines.append(
            f"{name:24s} ({tokens} x {width}, {heads} heads): grid step {ours * 1e3:9.1f} ms; reference one "
            f"member {one * 1e3:8.1f} ms x {len(grid)} = {one * len(grid) * 1e3:9.1f} ms; ratio "
            f"{ours / (one * len(grid)):.3f}"
        )
    return "\n".join(lines)


WORKER = textwrap.dedent("""
    import sys, time, torch
    sys.path[:0] = [{src!r}, {root!r}]
    from benchmarks.gpu import grid_step_seconds
    from layerprobe.train import make_grid
    device = torch.device({device!r})
    grid = make_grid(**{grid!r})
    start = time.perf_counter()
    grid_step_seconds({tokens}, {width}, {heads}, batch={batch}, grid=grid, device=device, steps={steps})
    print(time.perf_counter() - start)
""")


def two_workers(device, *, quick: bool) -> str:
    """Wall time of one training process alone against two at once on the same device (each a fresh process, as two
    Prefect process workers sharing one GPU would run their units)."""
    _, tokens, width, heads = (QUICK_SHAPES if quick else SHAPES)[0]
    grid = {"lrs": [1e-2, 1e-3], "weight_decays": [1e-4], "attn_dropouts": [0.0]} if quick else PAPER_GRID
    code = WORKER.format(
        src=str(ROOT / "src"),
        root=str(ROOT),
        device=str(device),
        grid=grid,
        tokens=tokens,
        width=width,
        heads=heads,
        batch=32 if quick else 2048,
        steps=3 if quick else 30,
    )

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code], env=environment(), stdout=subprocess.PIPE, text=True)

    alone = time.perf_counter()
    start().wait()
    alone = time.perf_counter() - alone
    both = time.perf_counter()
    processes = [start(), start()]
    for process in processes:
        process.wait()
    both = time.perf_counter() - both
    return f"one process alone {alone:.1f} s; two at once {both:.1f} s; throughput of two / one {2 * alone / both:.2f}x"


def quick_params(folder: Path) -> Path:
    """A tiny suite for the dry run: one random-init backbone, one generated dataset of 200 images, two probes."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["suite"] = {
        "name": "gpu-quick",
        "backbones": ["vit_tiny_d6"],
        "datasets": ["shapes"],
        "probes": ["linear_last_cls", "alf"],
    }
    params["datasets"]["shapes"]["options"]["num_images"] = 200
    params["train"].update({"min_steps": 20, "lrs": [1e-2], "weight_decays": [1e-4]})
    params["paths"] = {key: str(folder / value) for key, value in params["paths"].items()}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="every section at tiny sizes (a dry run)")
    parser.add_argument(
        "--results", type=Path, help="the results file to append to (default: benchmarks/RESULTS.md, with --quick none)"
    )
    parser.add_argument("--out", type=Path, help="also write the section, calibration file and plan output here")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device here; run it where a GPU is lent (or --device cpu --quick)")
    device = torch.device(args.device)
    results = args.results or (None if args.quick else ROOT / "benchmarks" / "RESULTS.md")
    work = Path(tempfile.mkdtemp(prefix="layerprobe-gpu-"))
    begun = time.perf_counter()
    sections = []
    try:
        extract = (
            [
                "--model",
                "vit_tiny_patch16_224",
                "--img-size",
                "32",
                "--batch-size",
                "16",
                "--num-images",
                "64",
                "--repeats",
                "1",
            ]
            if args.quick
            else [
                "--model",
                "vit_base_patch16_224",
                "--img-size",
                "224",
                "--batch-size",
                "256",
                "--num-images",
                "10000",
                "--repeats",
                "1",
            ]
        )
        sections.append(
            (
                "Extraction vs a bare timm forward (`benchmarks/extract.py`, bfloat16)",
                run(
                    [
                        sys.executable,
                        "benchmarks/extract.py",
                        *extract,
                        "--device",
                        args.device,
                        "--precision",
                        "bfloat16",
                    ],
                    timeout=90 if args.quick else 120,
                ),
            )
        )
        sections.append(
            (
                "Probe steps at the paper's shapes: grid at once vs the reference one member at a time",
                probe_steps(device, quick=args.quick),
            )
        )
        calibration = work / f"calibration-{args.device}.json"
        params = quick_params(work) if args.quick else ROOT / "params.paper.yaml"
        plan = ["plan", "--params", str(params), "--device", args.device, "--calibration", str(calibration)]
        plan_output = run([sys.executable, "-m", "layerprobe.cli", *plan, "--workers", "8"], timeout=420)
        title = f"`layerprobe plan --device {args.device}` for {params.name} (calibration `{calibration.name}`)"
        sections.append((title, plan_output))
        sections.append(("Two process workers on one device", two_workers(device, quick=args.quick)))
        seconds = time.perf_counter() - begun
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
        dry = " --quick (dry run)" if args.quick else ""
        text = [
            f"\n## GPU check — `benchmarks/gpu.py`{dry}\n",
            f"{dt.date.today().isoformat()}, {name}, torch {torch.__version__}, {seconds:.0f} s in all:\n",
        ]
        for title, output in sections:
            text.append(f"{title}:\n\n```\n{output}\n```\n")
        section = "\n".join(text)
        print(section)
        if results is not None:
            with results.open("a") as sink:
                sink.write(section)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu-section.md").write_text(section)
            (args.out / "plan-output.txt").write_text(plan_output)
            if calibration.is_file():
                shutil.copy2(calibration, args.out / calibration.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
