"""Time one ALF training step (forward + backward): reassociated form vs the straightforward per-token K/V form.

What: both heads hold the same weights (the straightforward one is `ReferenceAttentiveHead`, written like the
reference code with nn.Linear over every token); we time forward+backward of the cross-entropy loss at the
paper's batch 2048, 26 tokens (ViT-S: 12 blocks -> 13 layers x cls/ap), D=384, 26 heads, and print both times
and their ratio. The two forms' logits are compared first so the timing is of the same function.
How:  /work/venv/bin/python benchmarks/probe_step.py [--batch 2048 --tokens 26 --dim 384 --repeats 3]
Cost: about 15-30 s on 2 CPU cores (most of it the straightforward form); needs ~3 GB RAM.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from layerprobe.device import flush_denormals
from layerprobe.probes import ReferenceAttentiveHead, build_probe, get_probe_spec, normalize_tokens


def time_step(head: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, *, repeats: int) -> float:
    """Median seconds of one forward+backward (after a warm-up step)."""
    times = []
    for i in range(repeats + 1):
        head.zero_grad(set_to_none=True)
        start = time.perf_counter()
        logits = head(x)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.repeat(logits.numel() // labels.numel() // logits.shape[-1])
        )
        loss.backward()
        if i > 0:  # the first call pays for allocations
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    flush_denormals()  # as the flows do; both paths measured alike
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=26)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=None, help="default: number of tokens, as the reference")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    spec = get_probe_spec("alf")
    spec = type(spec)(spec.name, spec.layers, spec.tokens, spec.head, args.heads)
    fast = build_probe(spec, num_tokens=args.tokens, dim=args.dim, num_classes=args.classes, seed=0).train()
    slow = ReferenceAttentiveHead.from_member(fast, 0).train()
    x = normalize_tokens(torch.randn(args.batch, args.tokens, args.dim))
    labels = torch.randint(0, args.classes, (args.batch,))

    with torch.no_grad():
        fast.eval(), slow.eval()
        difference = (fast(x)[0] - slow(x)).abs().max().item()
        fast.train(), slow.train()
    print(
        f"config: batch {args.batch}, tokens {args.tokens}, dim {args.dim}, heads {fast.num_heads}, "
        f"head width {fast.head_dim}, threads {torch.get_num_threads()}"
    )
    print(f"max |logit difference| between the forms: {difference:.2e}")
    t_fast = time_step(fast, x, labels, repeats=args.repeats)
    t_slow = time_step(slow, x, labels, repeats=args.repeats)
    print(f"straightforward (per-token K/V) fwd+bwd: {t_slow:.3f} s/step")
    print(f"reassociated (alf)             fwd+bwd: {t_fast:.3f} s/step")
    print(f"ratio reassociated / straightforward: {t_fast / t_slow:.3f}  (target <= 0.2)")


if __name__ == "__main__":
    main()
