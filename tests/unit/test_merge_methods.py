"""Merge methods against straightforward reference computations, plus their properties.

The references are written the obvious way (whole tensors, sorts, float64 where it helps);
the implementations stream chunks, select with radix histograms and use a counter-based
RNG, so agreement here is what makes those optimisations safe.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from branchmerge_trainer.merge.methods import METHODS, get_method
from branchmerge_trainer.merge.methods._common import TopKMask, flat_chunks, seed_key, uniform
from branchmerge_trainer.merge.methods._select import order_statistics_with_counts
from branchmerge_trainer.merge.methods.arcee_fusion import SAMPLE_SIZE, arcee_fusion
from branchmerge_trainer.merge.methods.dare_linear import dare_linear
from branchmerge_trainer.merge.methods.dare_ties import dare_ties
from branchmerge_trainer.merge.methods.linear import linear
from branchmerge_trainer.merge.methods.model_stock import model_stock
from branchmerge_trainer.merge.methods.slerp import slerp
from branchmerge_trainer.merge.methods.task_arithmetic import task_arithmetic
from branchmerge_trainer.merge.methods.ties import ties
from branchmerge_trainer.merge.params import check_value, depth_fraction, evaluate, resolve

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add synchronisation (badly so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family(
    shape: tuple[int, ...], n: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> list[torch.Tensor]:
    """A base and ``n`` fine-tunes (base + small deltas), like real specialists."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    return [base.to(dtype)] + [(base + torch.randn(shape, generator=g) * 1e-3).to(dtype) for _ in range(n)]


# --------------------------------------------------------------------------- references


def ref_arcee(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """mergekit's released code, verbatim in spirit (full sort; valid for ≤ 1e6 elements)."""
    diff = (R - L).abs()
    p = torch.softmax(R, dim=-1) + 1e-8
    q = torch.softmax(L, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    imp = diff * kl
    s, _ = torch.sort(imp.reshape(-1))
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (s.numel() - 1)).long()
    q1, med, q3 = s[idx]
    thr = med + 1.5 * (q3 - q1)
    mask = (imp >= thr).float()
    return L + (R - L) * mask


def ref_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    flat = x.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(-flat, stable=True)[:k]] = True
    return keep.reshape(x.shape)


def ref_task_vectors(base, others, weights, masks, *, consensus, normalize, lambda_, rescale):  # type: ignore[no-untyped-def]
    b = base.double()
    deltas = []
    for x, w, m in zip(others, weights, masks, strict=True):
        d = x.double() - b
        kept = d * m
        if rescale and d.abs().sum() >= 1e-7 and kept.abs().sum() >= 1e-7:
            kept = kept * (d.abs().sum() / kept.abs().sum())
        deltas.append(kept * w)
    stack = torch.stack(deltas)
    if consensus:
        majority = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
        agree = torch.sign(stack) == majority
        mixed = (stack * agree).sum(0)
        if normalize:
            div = (torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * b.dim()) * agree).sum(0)
            mixed = mixed / torch.where(div == 0, 1.0, div)
    else:
        mixed = stack.sum(0)
        if normalize and abs(sum(weights)) >= 1e-8:
            mixed = mixed / sum(weights)
    return b + lambda_ * mixed


# --------------------------------------------------------------------------- arcee fusion


@pytest.mark.parametrize("shape", [(64, 96), (7,), (3, 5, 33), (1000, 999), (1, 1)])
def test_arcee_fusion_matches_mergekit_code_exactly(shape: tuple[int, ...]) -> None:
    L, R = family(shape, 1, seed=len(shape))
    assert torch.equal(arcee_fusion(L, R), ref_arcee(L, R).to(torch.bfloat16))


def test_arcee_fusion_float32_math_matches_reference() -> None:
    L, R = (t.float() for t in family((128, 257), 1, seed=3))
    out = arcee_fusion(L, R, out_dtype=torch.float32)
    assert torch.equal(out, ref_arcee(L, R))


@FAST
@given(
    rows=st.integers(1, 8),
    cols=st.integers(1, 24),
    data=st.data(),
)
def test_arcee_fusion_elements_come_from_base_or_other(rows: int, cols: int, data: st.DataObject) -> None:
    """With float32 math on bf16-valued weights (R - L exact), each element is L's or R's; in
    bf16 math unselected elements are exactly L's (selected ones carry mergekit's rounding)."""
    ints = st.integers(-512, 512)
    L = (
        torch.tensor(data.draw(st.lists(ints, min_size=rows * cols, max_size=rows * cols))).reshape(
            rows, cols
        )
        / 256
    )
    R = (
        torch.tensor(data.draw(st.lists(ints, min_size=rows * cols, max_size=rows * cols))).reshape(
            rows, cols
        )
        / 256
    )
    out = arcee_fusion(L.float(), R.float(), out_dtype=torch.float32)
    assert bool(((out == L) | (out == R)).all())
    stats: dict[str, float] = {}
    out_bf = arcee_fusion(L.bfloat16(), R.bfloat16(), stats=stats)
    picked = out_bf != L.bfloat16()
    assert int(picked.sum()) <= stats["fused"]
    assert torch.equal(out_bf[~picked], L.bfloat16()[~picked])


def test_arcee_fusion_large_tensor_uses_exact_quantiles() -> None:
    """Above 1e6 elements mergekit samples its quantiles at random; ours are exact, which is
    what a full sort (mergekit's own rule applied to every score) gives."""
    L, R = family((1100, 1000), 1, seed=5)
    assert L.numel() > SAMPLE_SIZE
    stats: dict[str, float] = {}
    out = arcee_fusion(L, R, stats=stats)
    assert torch.equal(out, ref_arcee(L, R).to(torch.bfloat16))
    assert 0.01 < stats["fused"] / L.numel() < 0.2


# --------------------------------------------------------------------------- others


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(normalize: bool) -> None:
    xs = family((33, 70), 3, seed=1)
    w = [0.2, 1.5, 0.3, 1.0]
    out = linear(xs, w, normalize=normalize, out_dtype=torch.float32)
    ref = sum(wi * x.double() for wi, x in zip(w, xs, strict=True))
    ref = ref / sum(w) if normalize else ref
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-8)


@FAST
@given(n=st.integers(1, 4), w=st.lists(st.floats(0.05, 5), min_size=4, max_size=4), seed=st.integers(0, 99))
def test_linear_of_identical_models_is_the_model(n: int, w: list[float], seed: int) -> None:
    (x,) = family((9, 31), 0, seed=seed)
    assert torch.equal(linear([x] * n, w[:n]), x)


def test_task_arithmetic_matches_reference() -> None:
    base, *others = family((40, 50), 3, seed=2)
    w = [0.5, -0.25, 1.0]
    out = task_arithmetic(base, others, w, lambda_=0.7, out_dtype=torch.float32)
    ref = ref_task_vectors(
        base, others, w, [1, 1, 1], consensus=False, normalize=False, lambda_=0.7, rescale=False
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)


@FAST
@given(seed=st.integers(0, 1000), w=st.lists(st.floats(-2, 2), min_size=2, max_size=2))
def test_task_arithmetic_lambda_zero_is_the_base(seed: int, w: list[float]) -> None:
    base, *others = family((8, 17), 2, seed=seed)
    assert torch.equal(task_arithmetic(base, others, w, lambda_=0.0), base)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(density: float) -> None:
    base, *others = family((50, 61), 3, seed=4)
    w = [1.0, 0.5, 0.8]
    out = ties(base, others, w, [density] * 3, out_dtype=torch.float32)
    n = base.numel()
    masks = [
        ref_topk_mask((x.float() - base.float()).abs(), max(1, int(density * n))) if density < 1 else 1
        for x in others
    ]
    ref = ref_task_vectors(base, others, w, masks, consensus=True, normalize=True, lambda_=1.0, rescale=False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)


@FAST
@given(
    seed=st.integers(0, 1000),
    density=st.floats(0.05, 1.0),
    w=st.lists(st.floats(0.1, 2), min_size=3, max_size=3),
)
def test_ties_sign_election(seed: int, density: float, w: list[float]) -> None:
    """Every merged delta has the elected sign: that of the sum of trimmed weighted deltas."""
    base, *others = family((6, 23), 3, seed=seed, dtype=torch.float32)
    out = ties(base, others, w, [density] * 3, out_dtype=torch.float32)
    n = base.numel()
    trimmed = [
        (x - base) * ref_topk_mask((x - base).abs(), max(1, int(density * n))) * wi
        for x, wi in zip(others, w, strict=True)
    ]
    elected = torch.where(torch.stack(trimmed).sum(0) >= 0, 1.0, -1.0)
    moved = torch.sign(out - base)
    assert bool(((moved == 0) | (moved == elected)).all())


@pytest.mark.parametrize("fn,consensus", [(dare_linear, False), (dare_ties, True)])
def test_dare_matches_reference_with_the_same_random_stream(fn, consensus: bool) -> None:  # type: ignore[no-untyped-def]
    base, *others = family((70, 64), 2, seed=6)
    w, density, key = [0.6, 0.9], 0.3, 1234
    out = fn(base, others, w, [density] * 2, key=key, out_dtype=torch.float32)
    n = base.numel()
    masks = [
        (uniform(seed_key(key, "dare", i), slice(0, n), base.device) < density).reshape(base.shape)
        for i in range(2)
    ]
    ref = ref_task_vectors(
        base, others, w, masks, consensus=consensus, normalize=False, lambda_=1.0, rescale=True
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    kept = float(masks[0].float().mean())
    assert abs(kept - density) < 0.03
    assert torch.equal(out, fn(base, others, w, [density] * 2, key=key, out_dtype=torch.float32))
    assert not torch.equal(out, fn(base, others, w, [density] * 2, key=key + 1, out_dtype=torch.float32))


def test_uniform_stream_is_independent_of_chunking() -> None:
    whole = uniform(7, slice(0, 10_000), torch.device("cpu"))
    parts = torch.cat([uniform(7, s, torch.device("cpu")) for s in flat_chunks(10_000, 777)])
    assert torch.equal(whole, parts)
    assert 0.45 < float(whole.mean()) < 0.55 and float(whole.min()) >= 0 and float(whole.max()) < 1


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    dot = float((x / x.norm()) @ (y / y.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)).reshape(a.shape)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_reference(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 40, generator=g), torch.randn(30, 40, generator=g)
    torch.testing.assert_close(slerp(t, a, b).double(), ref_slerp(t, a, b), rtol=1e-5, atol=1e-6)
    near = a + 1e-5 * b  # colinear: plain lerp
    torch.testing.assert_close(
        slerp(t, a, near).double(), ((1 - t) * a + t * near).double(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(filter_wise: bool) -> None:
    base, *ws = (t.float() for t in family((12, 40), 3, seed=8))
    out = model_stock(base, ws, filter_wise=filter_wise, out_dtype=torch.float32)
    rows = (lambda t: t.reshape(t.shape[0], -1)) if filter_wise else (lambda t: t.reshape(1, -1))
    w0, offs = rows(base).double(), [rows(w).double() - rows(base).double() for w in ws]
    cos = []
    for i in range(3):
        for j in range(i + 1, 3):
            cos.append((offs[i] * offs[j]).sum(-1) / (offs[i].norm(dim=-1) * offs[j].norm(dim=-1)))
    c = torch.stack(cos).mean(0)[:, None]
    t = 3 * c / (1 + 2 * c)
    ref = t * torch.stack([rows(w).double() for w in ws]).mean(0) + (1 - t) * w0
    torch.testing.assert_close(out.double(), ref.reshape(base.shape), rtol=1e-5, atol=1e-7)


def test_registry_and_unknown_method() -> None:
    assert set(METHODS) == {"arcee_fusion", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                            "slerp", "model_stock"}  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown merge method 'della'.*supported"):
        get_method("della")
    with pytest.raises(ValueError, match=r"density.*above 1"):
        get_method("ties").param("density").check(1.5, "here")  # type: ignore[union-attr]


# --------------------------------------------------------------------------- selection


@FAST
@given(
    values=st.lists(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e-3, -7.0, math.inf, -math.inf]),
        min_size=1,
        max_size=300,
    ),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]),
    chunk=st.integers(1, 50),
    data=st.data(),
)
def test_order_statistics_equal_sorting(
    values: list[float], dtype: torch.dtype, chunk: int, data: st.DataObject
) -> None:
    x = torch.tensor(values).to(dtype)
    ranks = data.draw(st.lists(st.integers(0, x.numel() - 1), min_size=1, max_size=4))
    got = order_statistics_with_counts(lambda: [x[i : i + chunk] for i in range(0, x.numel(), chunk)], ranks)
    s = torch.sort(x).values
    for (v, at_most), r in zip(got, ranks, strict=True):
        assert float(v) == float(s[r])
        assert at_most == int((x <= v).sum())


@FAST
@given(
    values=st.lists(st.integers(0, 6), min_size=1, max_size=200),
    frac=st.floats(0, 1),
    chunk=st.integers(1, 40),
)
def test_topk_mask_equals_stable_sort(values: list[int], frac: float, chunk: int) -> None:
    """Exactly k kept, ties at the threshold broken by lowest index, across chunk borders."""
    x = torch.tensor(values, dtype=torch.float32)
    k = int(frac * x.numel())
    spans = list(flat_chunks(x.numel(), chunk))
    mask = TopKMask(lambda: (x[s] for s in spans), x.numel(), k)
    got = torch.cat([mask(x[s]) for s in spans]).bool()
    assert torch.equal(got, ref_topk_mask(x, k))


# --------------------------------------------------------------------------- parameters


def test_gradients_interpolate_over_depth_like_mergekit() -> None:
    assert depth_fraction("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert depth_fraction("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert depth_fraction("model.embed_tokens.weight", 5) == 0.0
    assert depth_fraction("model.layers.0.x", 1) == 1.0
    assert evaluate([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate([0.2, 0.4, 0.6], "x", 1.0) == pytest.approx(0.6)


def test_filters_first_match_then_fall_through() -> None:
    filtered = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}]
    assert evaluate(filtered, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(filtered, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate(filtered, "model.norm.weight", 0.0) is None
    scopes = [{"weight": filtered}, {"weight": 0.9}]
    assert resolve("weight", scopes, "model.norm.weight", 0.0, 1.0) == 0.9  # next scope
    assert resolve("density", scopes, "model.norm.weight", 0.0, 1.0) == 1.0  # default
    assert evaluate([{"value": 2.0}], "anything", 0.0) == 2.0  # no filter: always
    assert evaluate([{"filter": "*", "value": 3.0}], "anything", 0.0) == 3.0


@pytest.mark.parametrize("bad", ["x", [], [1, {"value": 1}], [{"filter": "a"}], [{"value": 1, "weight": 2}],
                                 [{"filter": 3, "value": 1}]])  # fmt: skip
def test_malformed_parameter_values_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="here"):
        check_value(bad, "here")
