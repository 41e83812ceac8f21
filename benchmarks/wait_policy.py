"""Training speed of a small ViT with OpenMP's default wait policy vs PASSIVE, on an idle and on a busy machine.

Why: PyTorch's CPU kernels run in OpenMP parallel regions. By default (libgomp) a thread that reaches the end of a
region spins for a while before sleeping, waiting for the others. When another process keeps the cores busy, the
thread it waits for is often descheduled, and the spinning threads burn its time slices: small models, whose steps
are thousands of short regions, slow down by an order of magnitude. `OMP_WAIT_POLICY=PASSIVE` makes waiting threads
sleep at once. layerprobe sets it (unless the user did) before torch is imported (`layerprobe/__init__.py`).
What: the pretrain stage's model (6 blocks, width 64, 32-px images, batch 128) training steps, each configuration in
a fresh process (the policy is read when torch loads), first on an idle machine, then with one busy-loop process per
core. Prints steps per second of each setting and its ratio to the default, for both.
How:  python benchmarks/wait_policy.py [--seconds 8]
Cost: about a minute.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys

STEP = """
import time, torch, timm
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=6, embed_dim=64, num_heads=4,
                          num_classes=6)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 6, (128,))
def step():
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
for _ in range(3):
    step()
start, steps = time.perf_counter(), 0
while time.perf_counter() - start < {seconds}:
    step()
    steps += 1
print(steps / (time.perf_counter() - start))
"""


# OpenMP settings compared, each in a fresh process: libgomp's default (spin about 300,000 times, then sleep), a
# short spin, and no spin at all.
CONFIGURATIONS = {
    "default": {},
    "GOMP_SPINCOUNT=50000": {"GOMP_SPINCOUNT": "50000"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def steps_per_second(settings: dict[str, str], seconds: float) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(settings)
    result = subprocess.run(
        [sys.executable, "-c", STEP.format(seconds=seconds)], env=env, capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip())


def busy_loop() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    figures = {}
    for machine in ("idle", "busy"):
        loops = []
        if machine == "busy":
            loops = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(cores)]
            for loop in loops:
                loop.start()
        try:
            figures[machine] = {name: steps_per_second(env, args.seconds) for name, env in CONFIGURATIONS.items()}
        finally:
            for loop in loops:
                loop.terminate()
    print(f"pretrain-sized ViT training steps/s, {cores} cores; busy = {cores} busy-loop processes beside it")
    for machine, by_name in figures.items():
        base = by_name["default"]
        cells = "   ".join(f"{name} {value:6.2f} ({value / base:.2f}x)" for name, value in by_name.items())
        print(f"{machine:5s} {cells}")


if __name__ == "__main__":
    main()
