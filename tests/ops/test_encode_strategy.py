"""fastsae/ops/_encode_strategy.py: ``auto`` picks the encoders' selection by measurement.

Timing is never real here (no timing assertions in tests): candidates advance a fake clock by a
set cost per call, and ``measure_on`` is forced on, so the CPU branch of ``time_call`` measures
the fake costs. The last tests run the real triton backend's slab strategy end to end (tiny
shapes, under the interpreter) against the float64 oracle, gradients included.
"""

from __future__ import annotations

import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastsae import ops  # noqa: E402
from fastsae import reference as ref  # noqa: E402
from fastsae.ops import _encode_strategy as es  # noqa: E402
from fastsae.ops import _reference  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Candidate:
    """A selection that costs ``costs[i]`` ms on its i-th call (the last cost repeats) and
    returns its own name, so the test sees which one's result came back."""

    def __init__(self, name, clock, *costs_ms, error=None):
        self.name, self.clock, self.costs, self.error = name, clock, costs_ms, error
        self.calls = 0

    def __call__(self, x_in, W_enc, b_enc, k, **kwargs):
        self.calls += 1
        if self.error is not None:
            raise self.error
        self.clock.now += self.costs[min(self.calls, len(self.costs)) - 1] / 1e3
        return self.name


def _auto(*, fused=3.0, slab=1.0, torch_ms=2.0, measure=True, errors=None):
    errors = errors or {}
    clock = FakeClock()
    cands = {
        "fused": Candidate("fused", clock, fused, error=errors.get("fused")),
        "slab": Candidate("slab", clock, slab, error=errors.get("slab")),
        "torch": Candidate("torch", clock, torch_ms, error=errors.get("torch")),
    }
    auto = es.AutoSelect(cands, clock=clock, measure_on=lambda device: measure)
    return auto, cands


def _args(B=8, d=4, n=32):
    return torch.zeros(B, d), torch.zeros(d, n), torch.zeros(n)


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("FASTSAE_ENCODE_STRATEGY", raising=False)
    with ops.use_backend("auto"):
        yield


def test_fastest_is_picked_and_its_result_returned(caplog):
    auto, cands = _auto(fused=3.0, slab=1.0, torch_ms=2.0)
    with caplog.at_level(logging.INFO, logger="fastsae.ops"):
        assert auto(*_args(), 5) == "slab"
    for cand in cands.values():
        assert cand.calls == 1 + es.REPEATS  # one warm-up, then the timed repeats
    (line,) = [r.getMessage() for r in caplog.records if "wins" in r.getMessage()]
    assert line.startswith("fastsae encode auto: slab wins for select_topk cpu float32 B~8")
    assert "slab 1.000 ms, torch 2.000 ms, fused 3.000 ms" in line


def test_winner_is_cached_per_key_and_not_measured_again():
    auto, cands = _auto()
    x, W, b = _args(B=8)
    auto(x, W, b, 5)
    timed = {name: c.calls for name, c in cands.items()}
    # Same key: B=7 and k=6 fall in the same power-of-two buckets as B=8, k=5.
    assert auto(x[:7], W, b, 6) == "slab"
    assert cands["slab"].calls == timed["slab"] + 1
    assert cands["fused"].calls == timed["fused"] and cands["torch"].calls == timed["torch"]
    assert len(auto.winners) == 1
    # Another key (B=9: next bucket) is measured afresh.
    auto(torch.zeros(9, 4), W, b, 5)
    assert len(auto.winners) == 2 and cands["fused"].calls == 2 * timed["fused"]


def test_key_separates_dtype_threshold_and_auxk():
    auto, _ = _auto()
    x, W, b = _args()
    auto(x, W, b, 5)
    auto(x, W, b, 5, threshold=torch.zeros(32))
    auto(x, W, b, 5, dead_mask=torch.ones(32, dtype=torch.bool), k_aux=16)
    auto(x.double(), W.double(), b.double(), 5)
    assert len(auto.winners) == 4


def test_median_ignores_a_slow_warm_up_and_one_outlier():
    """fused's first call (the JIT compile) takes 500 ms and one repeat 50 ms; its median is
    still the smallest."""
    auto, cands = _auto(slab=1.0, torch_ms=2.0)
    cands["fused"].costs = (500.0, 0.5, 50.0, 0.5, 0.5, 0.5)
    assert auto(*_args(), 5) == "fused"


@pytest.mark.parametrize("how", ["context", "env"])
def test_override_wins_without_measuring(how, monkeypatch):
    auto, cands = _auto(fused=3.0, slab=1.0, torch_ms=2.0)
    if how == "env":
        monkeypatch.setenv("FASTSAE_ENCODE_STRATEGY", "torch")
        assert auto(*_args(), 5) == "torch"
    else:
        monkeypatch.setenv("FASTSAE_ENCODE_STRATEGY", "slab")  # the context manager wins
        with ops.use_encode_strategy("torch"):
            assert auto(*_args(), 5) == "torch"
    assert cands["torch"].calls == 1
    assert cands["fused"].calls == cands["slab"].calls == 0
    assert not auto.winners


def test_override_also_wins_over_a_cached_winner():
    auto, cands = _auto()
    auto(*_args(), 5)
    with ops.use_encode_strategy("fused"):
        before = cands["fused"].calls
        assert auto(*_args(), 5) == "fused"
        assert cands["fused"].calls == before + 1


def test_ineligible_candidates_are_never_timed():
    """backend="triton" asked for Triton: torch is not a candidate, even though it is fastest."""
    auto, cands = _auto(fused=3.0, slab=2.0, torch_ms=0.1)
    with ops.use_backend("triton"):
        assert auto(*_args(), 5) == "slab"
    assert cands["torch"].calls == 0


def test_nothing_is_timed_where_timing_means_nothing():
    """CPU tensors (the interpreter, or a CPU run): no measurement, the default order's first."""
    auto, cands = _auto(measure=False)
    assert auto(*_args(), 5) == es.DEFAULT_ORDER[0]
    assert sum(c.calls for c in cands.values()) == 1
    assert not auto.winners


def test_default_measure_on_is_cuda_only():
    assert not es._default_measure_on(torch.device("cpu"))


def test_a_candidate_that_raises_is_excluded_with_a_log_line(caplog):
    auto, cands = _auto(fused=0.1, errors={"fused": ValueError("k=600 > MAX_K")})
    with caplog.at_level(logging.INFO, logger="fastsae.ops"):
        assert auto(*_args(), 5) == "slab"
    messages = [r.getMessage() for r in caplog.records]
    assert any("fused excluded" in m and "MAX_K" in m for m in messages)
    assert auto.winners[auto.key(*_args()[:2], 5)] == "slab"


def test_every_candidate_failing_raises():
    err = RuntimeError("boom")
    auto, _ = _auto(errors={"fused": err, "slab": err, "torch": err})
    with pytest.raises(RuntimeError, match="every encode strategy failed"):
        auto(*_args(), 5)


def test_time_call_cpu_median_with_an_injected_clock():
    clock = FakeClock()
    costs = iter([9.0, 1.0, 3.0, 2.0, 100.0, 2.5])

    def fn():
        clock.now += next(costs) / 1e3
        return "out"

    ms, out = es.time_call(fn, torch.device("cpu"), repeats=5, clock=clock)
    assert out == "out" and ms == pytest.approx(2.5)


def test_bad_strategy_names_fail_early(monkeypatch):
    with (
        pytest.raises(ValueError, match="unknown encode strategy 'heap'"),
        ops.use_encode_strategy("heap"),
    ):
        pass
    monkeypatch.setenv("FASTSAE_ENCODE_STRATEGY", "heap")
    with pytest.raises(ValueError, match="allowed: auto, fused, fused_registers, slab, torch"):
        ops.get_encode_strategy()


# ---------------------------------------------------------------------------------------------
# The real triton backend with each strategy, end to end (interpreter on CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["slab", "fused", "fused_registers"])
def test_strategy_encode_topk_matches_oracle_with_gradients(strategy, seed):
    """TopK + AuxK through fastsae.ops with each Triton strategy (``fused`` is the
    threshold-filtered kernel): codes and every gradient equal the oracle's (float64;
    integer-valued inputs give exact ties, broken by the lower index)."""
    B, d, n, k, k_aux = 5, 4, 40, 6, 5
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (B, d), generator=g).double().requires_grad_()
    W = torch.randint(-2, 3, (d, n), generator=g).double().requires_grad_()
    bias = torch.randint(-1, 2, (n,), generator=g).double().requires_grad_()
    b_dec = (torch.randint(-1, 2, (d,), generator=g).double() / 2).requires_grad_()
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    upstream = torch.randn(B, n, generator=g, dtype=torch.float64)
    leaves = (x, W, bias, b_dec)

    with ops.use_backend("triton"), ops.use_encode_strategy(strategy):
        got = ops.encode_topk(x, W, bias, k, b_dec=b_dec, dead_mask=dead, k_aux=k_aux)
    want = _reference.encode_topk(x, W, bias, k, b_dec=b_dec, dead_mask=dead, k_aux=k_aux)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.aux_indices, want.aux_indices)
    assert_close(got.values, want.values)
    assert_close(got.aux_values, want.aux_values)

    def loss(out):
        dense = ref.sparse_to_dense(out.values, out.indices, n)
        return (dense * upstream).sum() + ref.sparse_to_dense(
            out.aux_values, out.aux_indices, n
        ).sum()

    for name, a, b in zip(
        ("x", "W_enc", "b_enc", "b_dec"),
        torch.autograd.grad(loss(got), leaves),
        torch.autograd.grad(loss(want), leaves),
        strict=True,
    ):
        assert_close(a, b, msg=name)


def test_slab_strategy_falls_back_to_torch_above_max_k(monkeypatch):
    """k above the kernel's MAX_K runs the torch selection instead of crashing."""
    from fastsae.kernels import slab_topk
    from fastsae.ops import _triton

    monkeypatch.setattr(slab_topk, "MAX_K", 4)
    x, W, bias = (
        torch.randn(3, 5, dtype=torch.float64),
        torch.randn(5, 30, dtype=torch.float64),
        torch.randn(30, dtype=torch.float64),
    )
    top, idx, _, _ = _triton._select_slab(x, W, bias, 9)
    _, want = ref.topk(ref.pre_activations(x, W, bias), 9)
    assert torch.equal(idx, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only resolution")
def test_cpu_without_the_interpreter_runs_the_torch_path_untimed(monkeypatch):
    """On CPU without TRITON_INTERPRET, auto resolves to the torch backend, whose encoders call
    the torch selection directly: there is nothing to measure."""
    from fastsae.ops import _torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    name, fn = ops.implementation_of("encode_topk")
    assert name == "torch" and fn is _torch.encode_topk


def test_untimed_call_falls_through_a_refusing_candidate(caplog):
    """Without measurement, an implementation that refuses the arguments (ValueError before any
    launch, e.g. k above the fused kernel's MAX_K) hands the call to the next one."""
    auto, cands = _auto(measure=False, errors={"fused": ValueError("k=600 must be <= 512")})
    with caplog.at_level(logging.INFO, logger="fastsae.ops"):
        assert auto(*_args(), 5) == "slab"
    assert any("fused refused" in r.getMessage() for r in caplog.records)
    auto, _ = _auto(measure=False, errors={n: ValueError("no") for n in es.DEFAULT_ORDER})
    with pytest.raises(ValueError, match="no"):
        auto(*_args(), 5)
