"""Probe specs, token selection and the probe heads (linear baselines and ALF), stacked over a hyperparameter grid.

Every head carries a leading grid dimension G: member g has its own parameters (stacked tensors) and its own
hyperparameters, but all members read the same input batch, so a whole sweep trains in one forward/backward.
G=1 is a single probe. Heads take already gathered, L2-normalised tokens `x  # [B, K, D]`.

A selected token is a slot (layer index, token index) of the cache's [L, T] grid. The final layer's patch tokens
(cached apart, `[N, P, D_final]`, with extract.final_patch_tokens) continue the token axis of the final layer:
slot (L-1, T+p) is patch p.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerprobe.attention_pool import pool_and_project
from layerprobe.config import NORMALIZATIONS, PATCHES, PROBE_TOKENS
from layerprobe.registry import Registry, unknown_name_error

LAYER_PRESETS = ("all", "last", "paper", "two", "four")
HEAD_CHOICES = ("linear", "attentive")
NORM_EPS = 1e-5  # nn.LayerNorm / nn.BatchNorm1d default, as in the reference


# ---------------------------------------------------------------- specs and registry


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe reads and which head it puts on top.

    Attributes:
        name: registered name, e.g. "alf".
        layers: "all" (every cached layer), "last" (the final entry), "paper" (blocks 1..B-1 plus final, as the
            reference), "two" (block B//2 plus final) and "four" (blocks B//4, B//2, 3B//4 plus final), the paper's
            layer subsets, or cached-layer positions (negatives count from the end).
        tokens: which per-layer tokens, a subset of ("cls", "ap", "patches"), in the order they are fed to the head;
            "patches" is every patch token of the final layer, so a probe reading it reads the final layer only.
        head: "linear" (tokens concatenated) or "attentive" (the ALF cross-attention block).
        num_heads: attention heads; None = number of input tokens, as the reference's launcher sets it.
        normalize: how the selected tokens are L2-normalised (`normalize_selection`): "token" or "across_tokens".
        pad_final: whether a narrower final layer (CLIP's projection) is zero-padded to the blocks' width
            (`reading_widths`): True pads it, False keeps its width, None pads only when the selection mixes widths.
    """

    name: str
    layers: str | tuple[int, ...]
    tokens: tuple[str, ...] = ("cls", "ap")
    head: str = "linear"
    num_heads: int | None = None
    normalize: str = "token"
    pad_final: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            if self.layers not in LAYER_PRESETS:
                raise unknown_name_error("layer preset", self.layers, list(LAYER_PRESETS))
        else:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
            if not self.layers:
                raise ValueError(f"probe {self.name!r}: layers must not be empty")
        object.__setattr__(self, "tokens", tuple(self.tokens))
        for token in self.tokens:
            if token not in PROBE_TOKENS:
                raise unknown_name_error("token", token, list(PROBE_TOKENS))
        if not self.tokens or len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"probe {self.name!r}: tokens {self.tokens} must be a non-empty subset of {PROBE_TOKENS}")
        if self.reads_patches and self.layers not in ("last", (-1,)):
            raise ValueError(
                f"probe {self.name!r}: patch tokens are cached for the final layer only; "
                f"set layers: last (got {self.layers!r})"
            )
        if self.head not in HEAD_CHOICES:
            raise unknown_name_error("probe head", self.head, list(HEAD_CHOICES))
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"probe {self.name!r}: num_heads must be >= 1 or None, got {self.num_heads}")
        if self.normalize not in NORMALIZATIONS:
            raise unknown_name_error("token normalisation", self.normalize, list(NORMALIZATIONS))

    @property
    def reads_patches(self) -> bool:
        """Whether the probe reads the final layer's patch tokens (a cache extracted with final_patch_tokens)."""
        return PATCHES in self.tokens


_PROBES: Registry[ProbeSpec] = Registry("probe")
register_probe = _PROBES.register


def get_probe_spec(name: str, **overrides) -> ProbeSpec:
    """The registered probe spec called `name` (ValueError with the choices otherwise), with `overrides` applied.

    Overrides come from params.yaml (`probes.<name>: {layers, tokens, num_heads, normalize, pad_final}`); an unknown
    key is named.
    """
    spec = _PROBES.create(name)
    allowed = {f.name for f in dataclasses.fields(ProbeSpec)} - {"name", "head"}  # what a probe reads, not what it is
    for key in overrides:
        if key not in allowed:
            raise ValueError(f"probes.{name}.{key}: not a probe setting (choices: {', '.join(sorted(allowed))})")
    if "tokens" in overrides:
        overrides["tokens"] = tuple(overrides["tokens"])
    return dataclasses.replace(spec, **overrides)


def list_probes() -> list[str]:
    """Names of all registered probes."""
    return _PROBES.names()


@register_probe("linear_last_cls")
def _linear_last_cls() -> ProbeSpec:
    return ProbeSpec("linear_last_cls", layers="last", tokens=("cls",), head="linear")


@register_probe("linear_last_ap")
def _linear_last_ap() -> ProbeSpec:
    # MAE's baseline in the paper's appendix: MAE's CLS token is not trained by its objective, so it is the final
    # layer's average-pooled token that the standard linear probe reads there (report.BASELINES).
    return ProbeSpec("linear_last_ap", layers="last", tokens=("ap",), head="linear")


@register_probe("linear_last_cls_ap")
def _linear_last_cls_ap() -> ProbeSpec:
    return ProbeSpec("linear_last_cls_ap", layers="last", tokens=("cls", "ap"), head="linear")


@register_probe("linear_concat_all")
def _linear_concat_all() -> ProbeSpec:
    return ProbeSpec("linear_concat_all", layers="paper", tokens=("cls", "ap"), head="linear")


@register_probe("attentive_last_cls_ap")
def _attentive_last_cls_ap() -> ProbeSpec:
    return ProbeSpec("attentive_last_cls_ap", layers="last", tokens=("cls", "ap"), head="attentive")


@register_probe("alf")
def _alf() -> ProbeSpec:
    return ProbeSpec("alf", layers="paper", tokens=("cls", "ap"), head="attentive")


@register_probe("attentive_last_all_tokens")
def _attentive_last_all_tokens() -> ProbeSpec:
    # The paper's "all tokens, last layer" baseline: 8 heads in its main setting (not heads = tokens).
    return ProbeSpec("attentive_last_all_tokens", layers="last", tokens=("cls", PATCHES), head="attentive", num_heads=8)


@register_probe("alf_truncated")
def _alf_truncated() -> ProbeSpec:
    # ALF on the `paper` layers of the smallest depth within a margin of alf on val (`layerprobe.truncation`);
    # its saved spec names the layers it chose.
    return ProbeSpec("alf_truncated", layers="paper", tokens=("cls", "ap"), head="attentive")


@register_probe("alf_two_layers")
def _alf_two_layers() -> ProbeSpec:
    return ProbeSpec("alf_two_layers", layers="two", tokens=("cls", "ap"), head="attentive")


@register_probe("alf_four_layers")
def _alf_four_layers() -> ProbeSpec:
    return ProbeSpec("alf_four_layers", layers="four", tokens=("cls", "ap"), head="attentive")


@register_probe("linear_two_layers")
def _linear_two_layers() -> ProbeSpec:
    return ProbeSpec("linear_two_layers", layers="two", tokens=("cls", "ap"), head="linear")


@register_probe("linear_four_layers")
def _linear_four_layers() -> ProbeSpec:
    return ProbeSpec("linear_four_layers", layers="four", tokens=("cls", "ap"), head="linear")


@register_probe("per_layer")
def _per_layer() -> ProbeSpec:
    # The per-layer family (`layerprobe.per_layer`): a linear probe on each layer's cls, ap and both; its saved spec
    # names the (layer, kind) it chose on val.
    return ProbeSpec("per_layer", layers="all", tokens=("cls", "ap"), head="linear")


# Probes trained from another's trained probe (its selection and what it reads): their train task waits for that
# one's, and a suite must list both.
TRAINED_FROM = {"alf_truncated": "alf"}
# Probe families whose reading is fixed but for these settings (`layerprobe.per_layer` reads every layer's cls, ap
# and both, linearly, at the cache's width): params refuse any other.
FAMILY_SETTINGS = {"per_layer": ("layers",)}


# ---------------------------------------------------------------- token selection


def _layer_indices(layer_names: Sequence[str], layers: str | Sequence[int]) -> list[int]:
    num_layers = len(layer_names)
    if num_layers == 0:
        raise ValueError("layer_names is empty: the feature cache has no layers")
    if layers == "all":
        return list(range(num_layers))
    if layers == "last":
        return [num_layers - 1]
    if layers in ("paper", "two", "four"):
        blocks = {int(m.group(1)): i for i, n in enumerate(layer_names) if (m := re.fullmatch(r"block(\d+)", n))}
        if "final" not in layer_names or not blocks:
            raise ValueError(f"layers {layers!r} needs block<i> and 'final' layers; the cache has {list(layer_names)}")
        b = max(blocks) + 1  # blocks in the backbone
        wanted = {
            # The reference skips block 0 and keeps blocks 1..B-1 plus the final output: B layers -> 2B tokens.
            "paper": range(1, b),
            # Its appendix's subsets (A4): the middle block, or the quarterly ones (blocks 6 / 3, 6, 9 for B = 12).
            "two": [b // 2],
            "four": [b // 4, b // 2, 3 * b // 4],
        }[layers]
        missing = [f"block{i}" for i in wanted if i not in blocks]
        if missing:
            raise ValueError(f"layers {layers!r} needs {missing}, missing from the cache's layers {list(layer_names)}")
        return [blocks[i] for i in wanted] + [list(layer_names).index("final")]
    if isinstance(layers, str):
        raise unknown_name_error("layer preset", layers, list(LAYER_PRESETS))
    indices = []
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layer position {i} is out of range for {num_layers} cached layers {list(layer_names)}")
        indices.append(i % num_layers)
    return indices


def select_token_positions(
    layer_names: Sequence[str],
    token_names: Sequence[str],
    *,
    layers: str | Sequence[int],
    tokens: Sequence[str],
    num_patches: int = 0,
) -> list[tuple[int, int]]:
    """(layer index, token index) slots of the cache that a probe reads, ordered cls@l, ap@l, cls@l+1, ...

    Args:
        layer_names: the cache's layer axis, e.g. ["block0", ..., "block11", "final"].
        token_names: the cache's token axis, e.g. ["cls", "ap"].
        layers: "all" | "last" | "paper" | cached-layer positions (negatives allowed).
        tokens: token names to read per layer, in the order the head sees them; "patches" expands to the final
            layer's P patch tokens, slots (L-1, T+p).
        num_patches: P, patch tokens the cache holds for the final layer (0: none cached).
    """
    layer_indices = _layer_indices(layer_names, layers)
    num_cached = len(token_names)
    token_indices: list[int] = []
    for token in tokens:
        if token == PATCHES:
            if layer_indices != [len(layer_names) - 1]:
                raise ValueError(
                    f"patch tokens are cached for the final layer only, but the probe reads layers "
                    f"{[layer_names[i] for i in layer_indices]}; set layers: last"
                )
            if num_patches < 1:
                raise ValueError(
                    "the probe reads the final layer's patch tokens, which this feature cache does "
                    "not hold: set `extract.final_patch_tokens: true` and re-run extract"
                )
            token_indices.extend(range(num_cached, num_cached + num_patches))
        elif token not in token_names:
            raise unknown_name_error("token", token, list(token_names))
        else:
            token_indices.append(list(token_names).index(token))
    return [(li, ti) for li in layer_indices for ti in token_indices]


def token_labels(
    layer_names: Sequence[str], token_names: Sequence[str], positions: Sequence[tuple[int, int]]
) -> list[str]:
    """Readable names of the selected slots, e.g. ["block1/cls", "block1/ap", ..., "final/ap"]; patch p of the final
    layer is "final/patch<p>"."""
    num_cached = len(token_names)
    return [
        f"{layer_names[li]}/{token_names[ti] if ti < num_cached else f'patch{ti - num_cached}'}" for li, ti in positions
    ]


def reads_patches(positions: Sequence[Sequence[int]], num_cached_tokens: int) -> bool:
    """Whether `positions` select any of the final layer's patch tokens (slots past the cache's T tokens)."""
    return any(ti >= num_cached_tokens for _, ti in positions)


def reading_widths(
    spec: ProbeSpec, layer_widths: Sequence[int] | None, positions: Sequence[Sequence[int]]
) -> tuple[int | None, list[int] | None]:
    """The width `spec` gathers its tokens at, and the per-token widths its linear head concatenates (None: all).

    The cache zero-pads narrower layers (CLIP's 512-d projected final layer among 768-d blocks) to its common D;
    `spec.pad_final` decides what the probe sees of that padding:
    - None: the widest selected layer. Final-layer-only probes read their tokens unpadded (no input always zero, and
      the jitter lands only on real features); probes mixing widths read every token padded to the widest.
    - True: every token at the blocks' width D. The reference's attentive launcher sizes its probe by the largest
      `embedding_dim` of the model set, which its models config gives as the blocks' width for CLIP's CLS/AP keys,
      and its `stacked_zero_pad` combiner pads every token to it.
    - False: every token at its own width. A linear head concatenates them unpadded (the reference's `concat`
      combiner); an attentive head needs one width, so a selection mixing widths is refused.
    Caches that record no widths (None) are read whole: (None, None).
    """
    if not layer_widths:
        return None, None
    widths = [int(layer_widths[li]) for li, _ in positions]
    if spec.pad_final:
        return max(int(w) for w in layer_widths), None
    if spec.pad_final is None or len(set(widths)) == 1:
        return max(widths), None
    if spec.head != "linear":
        mixed = sorted(set(widths))
        raise ValueError(
            f"probes.{spec.name}.pad_final: false keeps each token at its own width, but an attentive "
            f"head reads one width and this selection mixes {mixed}; set true or null"
        )
    return max(widths), widths


def gather_tokens(
    tokens: torch.Tensor,
    positions: Sequence[tuple[int, int]],
    *,
    rows: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Pick the selected slots out of a cache tensor; never writes into `tokens` (it may be read-only).

    Args:
        tokens: cached features `[N, L, T, D]` (any float dtype).
        positions: slots from `select_token_positions`.
        rows: optional image indices, to gather one batch without touching the rest.
        patches: the final layer's patch tokens `[N, P, D_final]`, needed when `positions` select any.
        width: keep the first `width` features of each token (`reading_widths`); None keeps all D.

    Returns:
        `[N or len(rows), K, width or D]` float32, K = len(positions).
    """
    return gather_raw(tokens, positions, rows=rows, patches=patches, width=width).float()


def gather_raw(
    tokens: torch.Tensor,
    positions: Sequence[tuple[int, int]],
    *,
    rows: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """As `gather_tokens` but keeps the cache's dtype (float16 selections are half the memory).

    Makes one copy of what it selects: patch tokens are copied slice by slice, never through a temporary.
    """
    if tokens.dim() != 4:
        raise ValueError(f"tokens must be [N, L, T, D], got shape {tuple(tokens.shape)}")
    if not positions:
        raise ValueError("positions is empty: the probe selects no tokens")
    num_layers, num_cached, dim = tokens.shape[1], tokens.shape[2], tokens.shape[3]
    width = dim if width is None else int(width)
    if not 0 < width <= dim:
        raise ValueError(f"width {width} is outside the cached token width 1..{dim}")
    view = tokens[..., :width]
    if rows is not None:
        rows = rows.to(tokens.device)
    cached = [(k, li, ti) for k, (li, ti) in enumerate(positions) if ti < num_cached]
    from_patches = [(k, li, ti - num_cached) for k, (li, ti) in enumerate(positions) if ti >= num_cached]

    def take(slots: list[tuple[int, int, int]]) -> torch.Tensor:
        layer_index = torch.tensor([s[1] for s in slots], dtype=torch.long, device=tokens.device)
        token_index = torch.tensor([s[2] for s in slots], dtype=torch.long, device=tokens.device)
        if rows is None:
            return view[:, layer_index, token_index]  # advanced indexing copies: [N, K, width]
        return view[rows[:, None], layer_index[None, :], token_index[None, :]]

    if not from_patches:
        return take(cached)
    if patches is None:
        raise ValueError("the probe reads final-layer patch tokens, but none were given (read_features(patches=True))")
    if any(li != num_layers - 1 for _, li, _ in from_patches):
        raise ValueError(f"patch-token slots must be on the final layer ({num_layers - 1}); got {from_patches[:3]}")
    if patches.dim() != 3 or patches.shape[0] != tokens.shape[0]:
        raise ValueError(f"patches must be [N={tokens.shape[0]}, P, D], got shape {tuple(patches.shape)}")
    if max(p for _, _, p in from_patches) >= patches.shape[1]:
        raise ValueError(
            f"positions select patch {max(p for _, _, p in from_patches)}, but only "
            f"{patches.shape[1]} patch tokens are cached"
        )
    count = tokens.shape[0] if rows is None else len(rows)
    patch_width = min(width, patches.shape[2])
    make = tokens.new_zeros if patch_width < width else tokens.new_empty  # a narrower final layer is zero-padded
    out = make((count, len(positions), width))
    if cached:
        out[:, [k for k, _, _ in cached]] = take(cached)
    for slot, first, length in _runs([(k, p) for k, _, p in from_patches]):
        source = patches[:, first : first + length] if rows is None else patches[rows, first : first + length]
        out[:, slot : slot + length, :patch_width] = source[..., :patch_width]
    return out


def _runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(output slot, patch index) pairs grouped into runs where both go up by one: (first slot, first patch, length)."""
    runs: list[list[int]] = []
    for slot, patch in pairs:
        if runs and slot == runs[-1][0] + runs[-1][2] and patch == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([slot, patch, 1])
    return [(a, b, c) for a, b, c in runs]


def normalize_tokens(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise every (image, token) vector of `x  # [..., D]`; all-zero vectors stay zero (no NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def normalize_across_tokens(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise every feature of `x  # [B, K, D]` over the K tokens of its image (the reference's all-tokens
    baseline: `F.normalize(features, dim=1)` on `[N, T, D]`); an all-zero feature (padding) stays zero."""
    return x / x.norm(dim=-2, keepdim=True).clamp_min(1e-12)


_NORMALIZERS = {"token": normalize_tokens, "across_tokens": normalize_across_tokens}
assert set(_NORMALIZERS) == set(NORMALIZATIONS), "config.NORMALIZATIONS names the normalisations defined here"


def normalize_selection(x: torch.Tensor, how: str = "token") -> torch.Tensor:
    """Selected tokens `x  # [B, K, D]` normalised the probe's way (`ProbeSpec.normalize`): "token" or
    "across_tokens"."""
    if how not in _NORMALIZERS:
        raise unknown_name_error("token normalisation", how, list(_NORMALIZERS))
    return _NORMALIZERS[how](x)


# ---------------------------------------------------------------- heads


def set_matmul_dtype(head: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Run `head`'s matmuls in `dtype` (e.g. bfloat16 for mixed-precision training); returns `head`.

    Only the matmul operands are rounded: accumulation is float32, and parameters, softmax, norms, logits and the
    loss stay in the parameters' dtype. Not saved with the probe: a loaded probe computes in float32.
    """
    head.matmul_dtype = dtype
    return head


def _uniform_(tensor: torch.Tensor, fan_in: int, generator: torch.Generator) -> None:
    # nn.Linear's default init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both
    # weight and bias; the reference keeps these defaults.
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    tensor.uniform_(-bound, bound, generator=generator)


class StackedLinearHead(nn.Module):
    """G independent linear probes on the flattened tokens: `[B, K, D] -> logits [G, B, C]`.

    With `token_widths` (`reading_widths`), token k contributes its first `token_widths[k]` features only: tokens of
    different widths are concatenated unpadded, and the padding (and the jitter on it) never reaches the head.
    """

    def __init__(
        self, grid_size: int, in_features: int, num_classes: int, token_widths: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        if token_widths is not None and sum(token_widths) != in_features:
            raise ValueError(
                f"linear head: token widths {list(token_widths)} sum to {sum(token_widths)}, "
                f"not in_features {in_features}"
            )
        self.grid_size, self.in_features, self.num_classes = grid_size, in_features, num_classes
        self.token_widths = None if token_widths is None else [int(w) for w in token_widths]
        self.weight = nn.Parameter(torch.empty(grid_size, num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(grid_size, num_classes))
        self.matmul_dtype = torch.float32  # see `set_matmul_dtype`
        self.reset_parameters(seed=0)

    @torch.no_grad()
    def reset_parameters(self, *, seed: int) -> None:
        """Initialise every member identically from `seed` (member m equals a G=1 head with the same seed)."""
        generator = torch.Generator().manual_seed(seed)
        weight = torch.empty(self.num_classes, self.in_features)
        bias = torch.empty(self.num_classes)
        _uniform_(weight, self.in_features, generator)
        _uniform_(bias, self.in_features, generator)
        self.weight.copy_(weight.expand_as(self.weight))
        self.bias.copy_(bias.expand_as(self.bias))

    def describe(self) -> dict:
        """Constructor arguments, for checkpoints."""
        description = {
            "kind": "linear",
            "grid_size": self.grid_size,
            "in_features": self.in_features,
            "num_classes": self.num_classes,
        }
        if self.token_widths is not None:  # only when set: probes saved before it describe themselves unchanged
            description["token_widths"] = self.token_widths
        return description

    def forward(
        self, x: torch.Tensor, *, return_attention: bool = False, dropout_noise: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, None]:
        if self.token_widths is None:
            flat = x.reshape(x.shape[0], -1)  # [B, K*D], ordered cls@l, ap@l, ... like the reference's concat
        elif x.shape[1] != len(self.token_widths):
            raise ValueError(f"linear head expects {len(self.token_widths)} tokens, got {x.shape[1]}")
        else:
            flat = torch.cat([x[:, k, :w] for k, w in enumerate(self.token_widths)], dim=1)  # [B, sum of widths]
        if flat.shape[1] != self.in_features:
            raise ValueError(f"linear head expects {self.in_features} features per image, got {flat.shape[1]}")
        dtype = self.matmul_dtype
        logits = torch.einsum("bf,gcf->gbc", flat.to(dtype), self.weight.to(dtype)).to(x.dtype) + self.bias[:, None, :]
        return (logits, None) if return_attention else logits


class StackedAttentiveHead(nn.Module):
    """G ALF probes: one learned query cross-attends over the layer tokens (the reference's attentive block).

    Per member: query (N(0, 0.02)), LayerNorms on q, k, v, bias-free q/k/v maps D -> H*h, output projection
    H*h -> D with bias, no residual and no MLP, BatchNorm1d(D, affine) on the attended query, Linear(D, C).
    It is computed in the reassociated single-query form: W_k is folded into the query and values are
    projected after attending, so no per-token K/V projection is ever made (see docs/design.md "Cost").
    """

    def __init__(
        self, grid_size: int, dim: int, num_heads: int, num_classes: int, attn_dropout: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        if dim // num_heads < 1:
            raise ValueError(f"attentive head: dim {dim} is smaller than num_heads {num_heads}; use fewer heads")
        attn_dropout = [0.0] * grid_size if attn_dropout is None else [float(p) for p in attn_dropout]
        if len(attn_dropout) != grid_size:
            raise ValueError(f"attn_dropout has {len(attn_dropout)} values for a grid of {grid_size} members")
        if any(not 0.0 <= p < 1.0 for p in attn_dropout):
            raise ValueError(f"attn_dropout values must lie in [0, 1), got {attn_dropout}")
        self.grid_size, self.dim, self.num_heads, self.num_classes = grid_size, dim, num_heads, num_classes
        self.head_dim = 2 * (dim // num_heads)  # the reference doubled CAE's head width after an ablation
        self.scale = self.head_dim**-0.5
        inner = num_heads * self.head_dim
        g = grid_size

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(g, *shape))

        self.query = param(dim)
        self.norm_q_weight, self.norm_q_bias = param(dim), param(dim)
        self.norm_k_weight, self.norm_k_bias = param(dim), param(dim)
        self.norm_v_weight, self.norm_v_bias = param(dim), param(dim)
        self.q_weight, self.k_weight, self.v_weight = param(inner, dim), param(inner, dim), param(inner, dim)
        self.proj_weight, self.proj_bias = param(dim, inner), param(dim)
        self.bn_weight, self.bn_bias = param(dim), param(dim)
        self.classifier_weight, self.classifier_bias = param(num_classes, dim), param(num_classes)
        self.register_buffer("bn_running_mean", torch.zeros(g, dim))
        self.register_buffer("bn_running_var", torch.ones(g, dim))
        self.register_buffer("bn_num_batches_tracked", torch.zeros(g, dtype=torch.long))
        self.register_buffer("attn_dropout", torch.tensor(attn_dropout, dtype=torch.float32))
        self.bn_momentum = 0.1
        self.matmul_dtype = torch.float32  # see `set_matmul_dtype`
        self.reset_parameters(seed=0)

    @torch.no_grad()
    def reset_parameters(self, *, seed: int) -> None:
        """Initialise every member identically from `seed` (member m equals a G=1 head with the same seed)."""
        generator = torch.Generator().manual_seed(seed)
        d, inner, c = self.dim, self.num_heads * self.head_dim, self.num_classes
        values = {"query": torch.empty(d).normal_(0.0, 0.02, generator=generator)}
        for name, shape, fan_in in [
            ("q_weight", (inner, d), d),
            ("k_weight", (inner, d), d),
            ("v_weight", (inner, d), d),
            ("proj_weight", (d, inner), inner),
            ("proj_bias", (d,), inner),
            ("classifier_weight", (c, d), d),
            ("classifier_bias", (c,), d),
        ]:
            values[name] = torch.empty(shape)
            _uniform_(values[name], fan_in, generator)
        for norm in ("norm_q", "norm_k", "norm_v", "bn"):
            values[f"{norm}_weight"], values[f"{norm}_bias"] = torch.ones(d), torch.zeros(d)
        for name, value in values.items():
            getattr(self, name).copy_(value.expand_as(getattr(self, name)))
        self.bn_running_mean.zero_()
        self.bn_running_var.fill_(1.0)
        self.bn_num_batches_tracked.zero_()

    def describe(self) -> dict:
        """Constructor arguments, for checkpoints."""
        return {
            "kind": "attentive",
            "grid_size": self.grid_size,
            "dim": self.dim,
            "num_heads": self.num_heads,
            "num_classes": self.num_classes,
            "attn_dropout": self.attn_dropout.tolist(),
        }

    def _query_keys(self) -> torch.Tensor:
        """Per member and head, the query folded through W_k and LN_k's scale: `[G, H, D]`."""
        g, h, e, d = self.grid_size, self.num_heads, self.head_dim, self.dim
        query = F.layer_norm(self.query, (d,), eps=NORM_EPS) * self.norm_q_weight + self.norm_q_bias  # [G, D]
        q = torch.einsum("gd,ged->ge", query, self.q_weight).view(g, h, e)
        u = torch.einsum("ghe,ghed->ghd", q, self.k_weight.view(g, h, e, d))  # u_h = W_k,h^T q_h
        # LN_k(x) = xhat * gamma + beta; beta . u is the same for every token, so it cancels in the softmax.
        return u * self.norm_k_weight[:, None, :] * self.scale

    def _batch_norm(self, core: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """BatchNorm1d per member on `core + offset`, `core  # [G, B, D]` and a per-member constant `offset  # [G, D]`.

        In training the batch mean removes any constant, so `offset` (the output bias, and W_v beta_v when the
        member has no dropout) is kept out of the normalisation: its true gradient is exactly zero, and computing
        it as a sum of cancelling terms would hand Adam rounding noise to amplify into lr-sized steps.
        """
        if self.training:
            if core.shape[1] < 2:
                raise ValueError(f"batch norm in training needs at least 2 images per batch, got {core.shape[1]}")
            mean = core.mean(dim=1)
            centered = core - mean[:, None, :]
            var = centered.square().mean(dim=1)
            with torch.no_grad():
                n = core.shape[1]
                self.bn_running_mean.lerp_((mean + offset).detach(), self.bn_momentum)
                self.bn_running_var.lerp_(var.detach() * (n / (n - 1)), self.bn_momentum)
                self.bn_num_batches_tracked.add_(1)
            y_hat = centered * torch.rsqrt(var[:, None, :] + NORM_EPS)
        else:
            shift = offset - self.bn_running_mean
            y_hat = (core + shift[:, None, :]) * torch.rsqrt(self.bn_running_var[:, None, :] + NORM_EPS)
        return y_hat * self.bn_weight[:, None, :] + self.bn_bias[:, None, :]

    def forward(
        self,
        x: torch.Tensor,
        *,
        return_attention: bool = False,
        dropout_noise: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `[G, B, C]` for tokens `x  # [B, K, D]`; with `return_attention`, also `[G, B, H, K]`.

        Args:
            x: gathered, normalised tokens.
            return_attention: also return the post-softmax, pre-dropout attention.
            dropout_noise: uniform draws `[B, H, K]` shared by all members; member g drops where noise < p_g.
                Lets a grid and a lone member see the same masks. Drawn from torch's global RNG when None.
            keep: `[K]` bool, the tokens attended to (the knock-out, `layerprobe.truncation`): the others' scores are
                -inf, so the softmax renormalises over the kept ones, as if they were never given. None: all.
        """
        batch, num_tokens, dim = x.shape
        if dim != self.dim:
            raise ValueError(f"attentive head expects token width {self.dim}, got {dim}")
        if keep is not None and (keep.shape != (num_tokens,) or not bool(keep.any())):
            raise ValueError(f"keep must be [{num_tokens}] bool with a token kept, got {keep.tolist()}")
        g, h, e = self.grid_size, self.num_heads, self.head_dim
        x_hat = F.layer_norm(x, (dim,), eps=NORM_EPS)  # shared by every member: LN affine parts are per member
        tokens = x_hat.to(self.matmul_dtype)  # the matmuls' copy, made once for every member
        # Scores for every (member, head) pool j = g*H + h at once: one [J, D] x [D, B*K] matmul. The [J, B, K]
        # layout gives the softmax contiguous rows and pool_and_project per-member slices.
        query_keys = self._query_keys().reshape(g * h, dim).to(self.matmul_dtype)
        scores = (query_keys @ tokens.reshape(batch * num_tokens, dim).T).to(x.dtype).view(g * h, batch, num_tokens)
        if keep is not None:
            scores = scores.masked_fill(~keep.to(device=x.device, dtype=torch.bool), float("-inf"))
        attention = scores.softmax(dim=-1)  # [J, B, K]
        weights = attention
        dropping = self.training and bool((self.attn_dropout > 0).any())
        if dropping:
            if dropout_noise is None:
                dropout_noise = torch.rand(batch, h, num_tokens, device=x.device)
            p = self.attn_dropout.view(g, 1, 1, 1)
            keep = dropout_noise.transpose(0, 1)[None] >= p  # [G, H, B, K]
            weights = (attention.view(g, h, batch, num_tokens) * keep / (1.0 - p)).view(g * h, batch, num_tokens)
        # W_v sum_t a_t LN_v(x_t) = (W_v gamma_v) (sum_t a_t xhat_t) + (W_v beta_v) sum_t a_t. Folding gamma_v and
        # beta_v into W_v keeps elementwise work off the pooled [B, H, D] blocks, each member's as large as x.
        v_weight = self.v_weight.view(g, h, e, dim)
        value_weight = (v_weight * self.norm_v_weight[:, None, None, :]).view(g * h, e, dim)
        values = pool_and_project(weights, tokens, value_weight, num_members=g)  # [G, B, H*e]
        v_bias = torch.einsum("ghed,gd->ghe", v_weight, self.norm_v_bias)  # [G, H, e]
        constant = v_bias  # without dropout sum_t a_t = 1: W_v beta_v is the same for every image
        if dropping:
            has_dropout = (self.attn_dropout > 0).to(x.dtype).view(g, 1, 1)
            weight_sums = weights.sum(dim=-1).view(g, h, batch).transpose(1, 2) * has_dropout  # [G, B, H]
            values = values + (weight_sums[..., None] * v_bias[:, None]).reshape(g, batch, h * e)
            constant = v_bias * (1.0 - has_dropout)
        projection = self.proj_weight.to(self.matmul_dtype).transpose(1, 2)  # [G, H*e, D]
        attended = torch.bmm(values.to(self.matmul_dtype), projection).to(x.dtype)  # [G, B, D]
        offset = torch.einsum("ge,gde->gd", constant.reshape(g, h * e), self.proj_weight) + self.proj_bias
        features = self._batch_norm(attended, offset)
        logits = torch.einsum("gbd,gcd->gbc", features, self.classifier_weight) + self.classifier_bias[:, None, :]
        if not return_attention:
            return logits
        return logits, attention.view(g, h, batch, num_tokens).transpose(1, 2)  # [G, B, H, K]


class ReferenceAttentiveHead(nn.Module):
    """One ALF probe written the straightforward way (per-token K and V projections), like the reference code.

    For the equivalence test and the benchmark: trainable, built from one member of a stacked head.
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, 2 * (dim // num_heads)
        inner = num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.attn_dropout = attn_dropout
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, inner, bias=False)
        self.k = nn.Linear(dim, inner, bias=False)
        self.v = nn.Linear(dim, inner, bias=False)
        self.proj = nn.Linear(inner, dim)
        self.bn = nn.BatchNorm1d(dim, affine=True)
        self.classifier = nn.Linear(dim, num_classes)

    @classmethod
    @torch.no_grad()
    def from_member(cls, head: StackedAttentiveHead, member: int = 0) -> ReferenceAttentiveHead:
        """A copy of member `member` of `head` (weights, BN statistics, dropout and train/eval mode)."""
        ref = cls(head.dim, head.num_heads, head.num_classes, float(head.attn_dropout[member]))
        ref = ref.to(device=head.query.device, dtype=head.query.dtype)
        m = member
        ref.query.copy_(head.query[m].view(1, 1, -1))
        for norm in ("norm_q", "norm_k", "norm_v"):
            getattr(ref, norm).weight.copy_(getattr(head, f"{norm}_weight")[m])
            getattr(ref, norm).bias.copy_(getattr(head, f"{norm}_bias")[m])
        ref.q.weight.copy_(head.q_weight[m])
        ref.k.weight.copy_(head.k_weight[m])
        ref.v.weight.copy_(head.v_weight[m])
        ref.proj.weight.copy_(head.proj_weight[m])
        ref.proj.bias.copy_(head.proj_bias[m])
        ref.bn.weight.copy_(head.bn_weight[m])
        ref.bn.bias.copy_(head.bn_bias[m])
        ref.bn.running_mean.copy_(head.bn_running_mean[m])
        ref.bn.running_var.copy_(head.bn_running_var[m])
        ref.bn.num_batches_tracked.copy_(head.bn_num_batches_tracked[m])
        ref.classifier.weight.copy_(head.classifier_weight[m])
        ref.classifier.bias.copy_(head.classifier_bias[m])
        return ref.train(head.training)

    def forward(
        self, x: torch.Tensor, *, return_attention: bool = False, dropout_noise: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, C]` (and attention `[B, H, K]`) for tokens `x  # [B, K, D]`."""
        batch, num_tokens, _ = x.shape
        h = self.num_heads
        q = self.q(self.norm_q(self.query.expand(batch, -1, -1))).view(batch, 1, h, -1).transpose(1, 2)
        k = self.k(self.norm_k(x)).view(batch, num_tokens, h, -1).transpose(1, 2)  # [B, H, K, h]
        v = self.v(self.norm_v(x)).view(batch, num_tokens, h, -1).transpose(1, 2)
        attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, K]
        weights = attention
        if self.training and self.attn_dropout > 0:
            if dropout_noise is None:
                weights = F.dropout(attention, self.attn_dropout)
            else:
                weights = attention * (dropout_noise[:, :, None, :] >= self.attn_dropout) / (1 - self.attn_dropout)
        attended = self.proj((weights @ v).transpose(1, 2).reshape(batch, -1))
        logits = self.classifier(self.bn(attended))
        return (logits, attention[:, :, 0, :]) if return_attention else logits


def attentive_reference_forward(
    head: StackedAttentiveHead, x: torch.Tensor, member: int = 0, *, dropout_noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Member `member`'s logits `[B, C]` and attention `[B, H, K]`, computed the straightforward way.

    Works on a copy, so BatchNorm running statistics of `head` are not touched.
    """
    reference = ReferenceAttentiveHead.from_member(head, member)
    return reference(x, return_attention=True, dropout_noise=dropout_noise)


# ---------------------------------------------------------------- building heads

_HEADS: Registry[nn.Module] = Registry("probe head")


@_HEADS.register("linear")
def _make_linear(
    *, grid_size: int, in_features: int, num_classes: int, token_widths: Sequence[int] | None = None, **_: object
) -> nn.Module:
    return StackedLinearHead(grid_size, in_features, num_classes, token_widths)


@_HEADS.register("attentive")
def _make_attentive(
    *, grid_size: int, dim: int, num_heads: int, num_classes: int, attn_dropout: Sequence[float], **_: object
) -> nn.Module:
    return StackedAttentiveHead(grid_size, dim, num_heads, num_classes, attn_dropout)


def head_from_description(description: dict) -> nn.Module:
    """Rebuild an (uninitialised-weights) head from `head.describe()`, e.g. when loading a checkpoint."""
    kind = description.get("kind")
    return _HEADS.create(str(kind), **{k: v for k, v in description.items() if k != "kind"})


def build_probe(
    spec: ProbeSpec,
    *,
    num_tokens: int,
    dim: int,
    num_classes: int,
    grid_size: int = 1,
    attn_dropouts: Sequence[float] | None = None,
    seed: int = 0,
    token_widths: Sequence[int] | None = None,
) -> nn.Module:
    """A stacked head of `grid_size` members for `spec`, every member initialised from `seed`.

    Args:
        spec: what the probe reads and its head.
        num_tokens: K, tokens per image after selection.
        dim: D, token width.
        num_classes: C.
        grid_size: G, members trained at once.
        attn_dropouts: per-member attention dropout (attentive heads; ignored by linear ones).
        seed: initialisation seed; member m equals a G=1 probe built with the same seed.
        token_widths: per-token widths a linear head concatenates unpadded (`reading_widths`); None: K x D inputs.
    """
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    if spec.head == "linear":
        in_features = num_tokens * dim if token_widths is None else sum(token_widths)
        head: nn.Module = _HEADS.create(
            "linear", grid_size=grid_size, in_features=in_features, num_classes=num_classes, token_widths=token_widths
        )
    else:
        num_heads = spec.num_heads or num_tokens  # the reference's launcher: heads = number of input tokens
        dropouts = [0.0] * grid_size if attn_dropouts is None else list(attn_dropouts)
        head = _HEADS.create(
            "attentive",
            grid_size=grid_size,
            dim=dim,
            num_heads=num_heads,
            num_classes=num_classes,
            attn_dropout=dropouts,
        )
    head.reset_parameters(seed=seed)
    return head


@torch.no_grad()
def extract_member(stacked: nn.Module, member: int) -> nn.Module:
    """Member `member` of a stacked head as a G=1 head (same weights, buffers and train/eval mode)."""
    description = stacked.describe()
    if not 0 <= member < description["grid_size"]:
        raise ValueError(f"member {member} is out of range for a grid of {description['grid_size']}")
    description["grid_size"] = 1
    if "attn_dropout" in description:
        description["attn_dropout"] = [description["attn_dropout"][member]]
    single = head_from_description(description)
    state = {name: value[member : member + 1].clone() for name, value in stacked.state_dict().items()}
    single.load_state_dict(state)
    first = next(stacked.parameters())
    return single.to(device=first.device, dtype=first.dtype).train(stacked.training)
