"""Probe specs, token selection and the ALF head: the reassociated form equals the reference computation."""

from __future__ import annotations

import pytest
import torch

from layerprobe.config import ParamsError, ProbeConfig
from layerprobe.probes import (
    ProbeSpec,
    ReferenceAttentiveHead,
    attentive_reference_forward,
    build_probe,
    extract_member,
    gather_tokens,
    get_probe_spec,
    list_probes,
    normalize_selection,
    normalize_tokens,
    select_token_positions,
    set_matmul_dtype,
    token_labels,
)

LAYERS = ["block0", "block1", "block2", "block3", "final"]
TOKENS = ["cls", "ap"]


def randomise_(head: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere, including LayerNorm/BatchNorm affine parts and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in head.state_dict().items():
            if name == "attn_dropout" or not value.is_floating_point():
                continue
            noise = torch.randn(value.shape, generator=generator)
            if name == "bn_running_var":
                value.copy_(noise.abs() + 0.5)
            else:
                value.add_(0.3 * noise)


def test_registry_holds_the_paper_probes_and_names_bad_ones():
    assert {"linear_last_cls", "linear_last_cls_ap", "linear_concat_all", "attentive_last_cls_ap", "alf"} <= set(
        list_probes()
    )
    assert get_probe_spec("alf").layers == "paper"
    with pytest.raises(ValueError, match="Did you mean 'alf'"):
        get_probe_spec("alff")
    with pytest.raises(ValueError, match="unknown token 'patch'"):
        ProbeSpec("x", layers="all", tokens=("patch",))


def test_paper_layers_skip_block0_and_keep_cls_ap_order():
    positions = select_token_positions(LAYERS, TOKENS, layers="paper", tokens=("cls", "ap"))
    assert len(positions) == 2 * 4  # B = 4 blocks -> 2B tokens
    assert token_labels(LAYERS, TOKENS, positions)[:3] == ["block1/cls", "block1/ap", "block2/cls"]
    assert token_labels(LAYERS, TOKENS, positions)[-1] == "final/ap"
    assert select_token_positions(LAYERS, TOKENS, layers="last", tokens=("cls",)) == [(4, 0)]
    assert select_token_positions(LAYERS, TOKENS, layers=[-1, 0], tokens=("ap",)) == [(4, 1), (0, 1)]
    with pytest.raises(ValueError, match="out of range"):
        select_token_positions(LAYERS, TOKENS, layers=[7], tokens=("cls",))
    with pytest.raises(ValueError, match="block2"):
        select_token_positions(["block0", "block1", "block3", "final"], TOKENS, layers="paper", tokens=("cls",))


def test_two_and_four_layer_presets_are_the_papers_subsets():
    vit_b = [f"block{i}" for i in range(12)] + ["final"]

    def layers(preset: str) -> list[str]:
        return [
            label.split("/")[0]
            for label in token_labels(
                vit_b, TOKENS, select_token_positions(vit_b, TOKENS, layers=preset, tokens=("cls",))
            )
        ]

    assert layers("two") == ["block6", "final"]
    assert layers("four") == ["block3", "block6", "block9", "final"]
    for name, head in [("alf_two_layers", "attentive"), ("linear_four_layers", "linear")]:
        assert get_probe_spec(name).head == head and get_probe_spec(name).layers == name.split("_")[1]
    with pytest.raises(ValueError, match="layers 'four' needs \\['block1'\\]"):  # B = 4: blocks 1, 2, 3
        select_token_positions(["block0", "block2", "block3", "final"], TOKENS, layers="four", tokens=("cls",))


def test_gather_reads_a_read_only_half_cache_and_normalise_keeps_zero_vectors():
    cache = torch.arange(2 * 5 * 2 * 3, dtype=torch.float16).reshape(2, 5, 2, 3)
    cache[:, 2, 1] = 0.0  # zero padding / empty slot
    before = cache.clone()
    positions = [(1, 0), (2, 1)]
    gathered = gather_tokens(cache, positions)
    assert gathered.dtype == torch.float32 and gathered.shape == (2, 2, 3)
    assert torch.equal(gathered[:, 0], cache[:, 1, 0].float())
    assert torch.equal(gather_tokens(cache, positions, rows=torch.tensor([1])), gathered[1:])
    normalised = normalize_tokens(gathered)
    assert torch.isfinite(normalised).all()
    assert torch.allclose(normalised[:, 0].norm(dim=-1), torch.ones(2))
    assert torch.equal(normalised[:, 1], torch.zeros(2, 3))
    assert torch.equal(cache, before)


def test_across_tokens_normalises_each_feature_over_the_tokens_as_the_reference_loads_all_tokens():
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))  # [N, T, D], as the reference's all tokens
    x[..., 3] = 0.0  # a zero-padded feature
    # The reference (src/utils/utils.py, load_features): F.normalize(features, dim=1, p=2) on [N, T, D], i.e.
    # x[n, t, d] / max(sqrt(sum_t' x[n, t', d]^2), 1e-12): each feature over the tokens of its image.
    reference = x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    assert torch.allclose(normalize_selection(x, "across_tokens"), reference)
    assert torch.equal(normalize_selection(x, "across_tokens")[..., 3], torch.zeros(3, 5))  # padding stays zero
    # ours, and the reference's for every per-layer token: each token over its width
    assert torch.allclose(normalize_selection(x, "token"), x / x.pow(2).sum(dim=-1, keepdim=True).sqrt())
    assert torch.equal(normalize_selection(x), normalize_tokens(x))
    assert not torch.allclose(normalize_selection(x, "token"), reference)
    assert get_probe_spec("attentive_last_all_tokens").normalize == "token"  # the default stays ours
    assert get_probe_spec("attentive_last_all_tokens", normalize="across_tokens").normalize == "across_tokens"
    with pytest.raises(ValueError, match="unknown token normalisation 'across'.*Did you mean 'across_tokens'"):
        normalize_selection(x, "across")
    with pytest.raises(ParamsError, match=r"probes.\*.normalize must be one of \('token', 'across_tokens'\)"):
        ProbeConfig(normalize="per_token")
    with pytest.raises(ValueError, match="probes.alf.pad_width: not a probe setting"):
        get_probe_spec("alf", pad_width=True)


def test_linear_last_ap_reads_the_final_layers_average_pooled_token():
    spec = get_probe_spec("linear_last_ap")
    assert (spec.head, spec.layers, spec.tokens) == ("linear", "last", ("ap",))
    assert select_token_positions(LAYERS, TOKENS, layers=spec.layers, tokens=spec.tokens) == [(4, 1)]


@pytest.mark.parametrize("training", [True, False])
def test_reassociated_alf_matches_the_straightforward_form(training):
    head = build_probe(
        get_probe_spec("alf"), num_tokens=8, dim=24, num_classes=5, grid_size=3, attn_dropouts=[0.0, 0.1, 0.3], seed=1
    )
    randomise_(head)
    head.train(training)
    generator = torch.Generator().manual_seed(0)
    x = normalize_tokens(torch.randn(32, 8, 24, generator=generator))
    noise = torch.rand(32, head.num_heads, 8, generator=generator)
    references = [attentive_reference_forward(head, x, m, dropout_noise=noise) for m in range(3)]
    logits, attention = head(x, return_attention=True, dropout_noise=noise)
    assert logits.shape == (3, 32, 5) and attention.shape == (3, 32, 8, 8)
    for m, (ref_logits, ref_attention) in enumerate(references):
        # float32 in another order: a logit near zero differed by 1.4e-5 on one random draw (of 160), so 5e-5 (a
        # wrong reassociation is off by the logits' own size)
        torch.testing.assert_close(logits[m], ref_logits, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(attention[m], ref_attention, atol=1e-5, rtol=1e-5)
    if training:  # dropout changed the logits of the members that have it
        plain = head(x, dropout_noise=torch.ones_like(noise))
        assert torch.allclose(plain[0], logits[0], atol=1e-6)
        assert not torch.allclose(plain[2], logits[2], atol=1e-3)


def test_reassociated_gradients_match_the_straightforward_module():
    head = build_probe(get_probe_spec("alf"), num_tokens=6, dim=16, num_classes=3, seed=2).train()
    randomise_(head, seed=3)
    reference = ReferenceAttentiveHead.from_member(head, 0)
    x = normalize_tokens(torch.randn(20, 6, 16))
    head(x)[0].square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(head.k_weight.grad[0], reference.k.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.norm_v_weight.grad[0], reference.norm_v.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.query.grad[0], reference.query.grad.view(-1), atol=1e-4, rtol=1e-4)
    # Training-mode BatchNorm removes constants: the output bias and (without dropout) LN_v's bias have a zero true
    # gradient. The reference gets rounding noise there; the reassociated form leaves them out of the graph.
    assert reference.proj.bias.grad.abs().max() < 1e-4 and reference.norm_v.bias.grad.abs().max() < 1e-4
    assert head.proj_bias.grad is None and head.norm_v_bias.grad is None


@pytest.mark.parametrize("name", ["alf", "linear_concat_all"])
def test_bfloat16_matmuls_stay_close_to_float32_and_keep_float32_outputs(name):
    head = build_probe(get_probe_spec(name), num_tokens=8, dim=64, num_classes=5, grid_size=2, seed=3)
    randomise_(head, seed=4)
    x = normalize_tokens(torch.randn(48, 8, 64))
    exact = head(x)
    assert set_matmul_dtype(head, torch.bfloat16) is head
    mixed = head(x)
    assert mixed.dtype == torch.float32
    relative = (mixed - exact).norm() / exact.norm()
    assert 1e-6 < relative < 2e-2  # 8-bit mantissas in the matmuls, float32 everywhere else
    mixed.sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in head.parameters())


def test_heads_default_to_one_per_token_with_doubled_width():
    head = build_probe(get_probe_spec("alf"), num_tokens=8, dim=32, num_classes=4)
    assert head.num_heads == 8 and head.head_dim == 2 * (32 // 8)
    assert head.q_weight.shape == (1, 8 * 8, 32)
    linear = build_probe(get_probe_spec("linear_concat_all"), num_tokens=8, dim=32, num_classes=4, grid_size=2)
    assert linear(torch.randn(5, 8, 32)).shape == (2, 5, 4)


@pytest.mark.parametrize("name", ["alf", "linear_last_cls_ap"])
def test_member_of_a_grid_equals_a_single_probe_with_the_same_seed(name):
    spec = get_probe_spec(name)
    grid = build_probe(spec, num_tokens=2, dim=16, num_classes=3, grid_size=4, seed=7)
    single = build_probe(spec, num_tokens=2, dim=16, num_classes=3, seed=7)
    other = build_probe(spec, num_tokens=2, dim=16, num_classes=3, seed=8)
    member = extract_member(grid, 2)
    for key, value in single.state_dict().items():
        assert torch.equal(member.state_dict()[key], value), key
    assert not all(torch.equal(other.state_dict()[k], v) for k, v in single.state_dict().items())
    with pytest.raises(ValueError, match="out of range"):
        extract_member(grid, 4)
