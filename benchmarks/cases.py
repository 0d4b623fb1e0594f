"""The registry of benchmark cases. Each builder returns a :class:`Case` for one size.

Cases are built one at a time by :func:`cases` (a generator), so that the tensors of one case are
freed before the next is built: at the full shapes a single case holds gigabytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from benchmarks import analysis_cases, group, pipeline
from benchmarks.harness import Case
from benchmarks.steps import trainer_step
from fastsae import ops
from fastsae import reference as ref

SIZES = {
    # seconds on two CPU cores
    "smoke": {"B": 256, "d": 64, "n": 1024, "k": 8},
    # the shapes named in the kernel issues (CPU)
    "full": {"B": 4096, "d": 768, "n": 16384, "k": 32},
}
NO_GPU = "no CUDA device: the Triton kernels run on GPUs only"


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _backends() -> tuple[list[str], dict[str, str]]:
    """fastsae backends to time here, and the skipped ones with the reason."""
    if not torch.cuda.is_available():
        return ["torch"], {"fastsae-triton": NO_GPU}
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return ["torch"], {"fastsae-triton": f"triton is not importable: {exc}"}
    return ["triton", "torch"], {}


def sparse_decode_fwd_bwd(B: int, d: int, n: int, k: int) -> Case:
    """Sparse decode forward + backward (all three gradients) against a dense decode (scatter the
    codes into [B, n], then matmul) with autograd."""
    device = _device()
    g = torch.Generator(device="cpu").manual_seed(0)
    values = torch.rand(B, k, generator=g).to(device).requires_grad_(True)
    indices = torch.randint(0, n, (B, k), generator=g).to(device)
    W_dec = torch.randn(n, d, generator=g).to(device).requires_grad_(True)
    b_dec = torch.zeros(d, device=device, requires_grad=True)
    upstream = torch.randn(B, d, generator=g).to(device)
    leaves = (values, W_dec, b_dec)

    def fastsae_provider(backend: str):
        def run():
            with ops.use_backend(backend):
                out = ops.sparse_decode(values, indices, W_dec, b_dec)
            torch.autograd.grad(out, leaves, upstream)

        return run

    def dense():
        codes = torch.zeros(B, n, device=device).scatter_add(1, indices, values)
        out = ref.dense_decode(codes, W_dec, b_dec)
        torch.autograd.grad(out, leaves, upstream)

    backends, skipped = _backends()
    providers = {f"fastsae-{b}": fastsae_provider(b) for b in backends}
    providers["dense"] = dense
    return Case(
        name="sparse_decode_fwd_bwd",
        mode="fwd+bwd",
        shapes={"B": B, "d": d, "n": n, "k": k},
        providers=providers,
        skipped=skipped,
        # forward, grad_values and grad_W_dec are each 2*B*k*d FLOPs
        flops=6 * B * k * d,
        # three gathers/scatters of B*k rows of d, read g twice, write grad_W_dec [n, d] (fp32)
        bytes=4 * (3 * B * k * d + 2 * B * d + n * d),
        baseline="dense",
        items=B,
    )


def encoder_backward(B: int, d: int, n: int, k: int) -> Case:
    """Encoder backward from a sparse grad_pre [B, k] against dense autograd through
    pre = x @ W_enc + b_enc (the dense gradient is scattered to [B, n] first, as a dense TopK
    implementation does)."""
    device = _device()
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(B, d, generator=g).to(device)
    W_enc = torch.randn(d, n, generator=g).to(device).requires_grad_(True)
    b_enc = torch.zeros(n, device=device, requires_grad=True)
    indices = torch.randint(0, n, (B, k), generator=g).to(device)
    grad_pre = torch.randn(B, k, generator=g).to(device)
    pre = torch.addmm(b_enc, x, W_enc)  # graph kept for the dense provider

    def fastsae_provider(backend: str):
        def run():
            with ops.use_backend(backend):
                _, fn = ops.implementation_of("sparse_encoder_backward")
            fn(x, indices, grad_pre, W_enc.detach())

        return run

    def dense():
        G = torch.zeros(B, n, device=device).scatter_add(1, indices, grad_pre)
        torch.autograd.grad(pre, (W_enc, b_enc), G, retain_graph=True)

    backends, skipped = _backends()
    providers = {f"fastsae-{b}": fastsae_provider(b) for b in backends}
    providers["dense-autograd"] = dense
    return Case(
        name="encoder_backward",
        mode="bwd",
        shapes={"B": B, "d": d, "n": n, "k": k},
        providers=providers,
        skipped=skipped,
        flops=2 * B * k * d,
        # read x and the sparse gradient, write grad_W_enc [d, n] (fp32)
        bytes=4 * (B * d + n * d + 2 * B * k),
        baseline="dense-autograd",
        items=B,
    )


def _encoder_inputs(B: int, d: int, n: int, seed: int):
    device = _device()
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, d, generator=g).to(device)
    W_enc = (torch.randn(d, n, generator=g) / d**0.5).to(device)
    b_enc = torch.zeros(n, device=device)
    return x, W_enc, b_enc


#: B * n at which a [B, n] fp32 matrix is 256 MiB: beyond it a dense provider takes seconds per
#: call on two CPU cores, so such cases take fewer repeats to keep the full suite near 10 minutes.
HEAVY_ELEMENTS = 2**26


def _encode_case(
    name: str, B: int, d: int, n: int, k: int, fastsae_call, dense: dict, heavy_repeats: int = 5
) -> Case:
    """An inference encode (no grad) against dense providers and the encoder ``addmm`` floor."""
    x, W_enc, b_enc = _encoder_inputs(B, d, n, seed=2)

    def fastsae_provider(backend: str):
        def run():
            with torch.no_grad(), ops.use_backend(backend):
                fastsae_call(x, W_enc, b_enc)

        return run

    def with_no_grad(fn):
        def run():
            with torch.no_grad():
                fn(x, W_enc, b_enc)

        return run

    def addmm():
        torch.addmm(b_enc, x, W_enc)

    backends, skipped = _backends()
    providers = {f"fastsae-{b}": fastsae_provider(b) for b in backends}
    providers.update({label: with_no_grad(fn) for label, fn in dense.items()})
    providers["addmm-floor"] = addmm
    return Case(
        name=name,
        mode="fwd",
        shapes={"B": B, "d": d, "n": n, "k": k},
        providers=providers,
        skipped=skipped,
        flops=2 * B * d * n,
        # read x and W_enc, write B*k values and indices; the [B, n] matrix is never written
        bytes=4 * (B * d + d * n + 2 * B * k),
        baseline="addmm-floor",
        items=B,
        repeats=heavy_repeats if B * n >= HEAVY_ELEMENTS else None,
    )


def encode_topk_fwd(B: int, d: int, n: int, k: int) -> Case:
    """Encode + top-k (inference: no grad) against ``addmm`` + ``torch.topk`` on the dense
    pre-activations, and against the ``addmm`` alone: the physical floor of an exact TopK."""
    return _encode_case(
        "encode_topk_fwd",
        B,
        d,
        n,
        k,
        lambda x, W, b: ops.encode_topk(x, W, b, k),
        {"addmm+topk": lambda x, W, b: torch.topk(torch.addmm(b, x, W), k, dim=-1)},
    )


ENCODE_STRATEGIES = ("fused", "fused_registers", "slab", "torch")


def encode_topk_strategies_fwd(B: int, d: int, n: int, k: int) -> Case:
    """The triton backend's encode strategies side by side (inference, no grad): the fused
    encode + top-k kernel, slab + select (cuBLAS into slabs + a streaming Triton top-k), torch
    (cuBLAS + ``torch.topk``), and ``auto`` (measured once, then the winner), against ``addmm`` +
    ``torch.topk`` and the ``addmm`` floor. bf16 on a GPU, as in training. Without a GPU only the
    torch backend runs; the Triton strategies are recorded as skipped."""
    device = _device()
    x, W_enc, b_enc = _encoder_inputs(B, d, n, seed=3)
    if device == "cuda":
        x, W_enc, b_enc = x.bfloat16(), W_enc.bfloat16(), b_enc.bfloat16()

    def strategy(name: str, backend: str = "triton"):
        def run():
            with torch.no_grad(), ops.use_backend(backend), ops.use_encode_strategy(name):
                ops.encode_topk(x, W_enc, b_enc, k)

        return run

    backends, skipped = _backends()
    if "triton" in backends:
        providers = {f"fastsae-{name}": strategy(name) for name in ENCODE_STRATEGIES}
        providers["fastsae-auto"] = strategy("auto", backend="auto")
        skipped = {}
    else:
        reason = skipped["fastsae-triton"]
        names = ("fused", "fused_registers", "slab", "auto")
        skipped = {f"fastsae-{name}": reason for name in names}
        providers = {"fastsae-torch": strategy("torch", backend="torch")}

    def addmm_topk():
        with torch.no_grad():
            torch.topk(torch.addmm(b_enc, x, W_enc), k, dim=-1)

    providers["addmm+topk"] = addmm_topk
    providers["addmm-floor"] = lambda: torch.addmm(b_enc, x, W_enc)
    s = x.element_size()
    return Case(
        name="encode_topk_strategies_fwd",
        mode="fwd",
        shapes={"B": B, "d": d, "n": n, "k": k},
        providers=providers,
        skipped=skipped,
        flops=2 * B * d * n,
        # read x and W_enc, write B*k values and indices; slab and torch also write and read
        # the [B, n] scores once per slab (provider_cost)
        bytes=s * (B * d + d * n) + 12 * B * k,
        provider_cost={
            p: (2 * B * d * n, s * (B * d + d * n + 2 * B * n) + 12 * B * k)
            for p in ("fastsae-slab", "fastsae-torch")
            if p in providers
        },
        baseline="addmm-floor",
        items=B,
        repeats=3 if B * n >= HEAVY_ELEMENTS else None,
    )


def encode_batch_topk_fwd(B: int, d: int, n: int, k: int) -> Case:
    """BatchTopK encode (keep the k*B largest of the batch; inference, no grad) against the dense
    oracle (pre-activations + :func:`fastsae.reference.batch_topk`, a stable sort of all B*n
    entries), against a dense ``torch.topk`` over the flattened batch, and the ``addmm`` floor."""

    def flat_topk(x, W, b):
        pre = torch.relu(torch.addmm(b, x, W))
        torch.topk(pre.reshape(-1), k * B)

    return _encode_case(
        "encode_batch_topk_fwd",
        B,
        d,
        n,
        k,
        lambda x, W, b: ops.encode_batch_topk(x, W, b, k),
        {
            "dense-reference": lambda x, W, b: ref.batch_topk(ref.pre_activations(x, W, b), k),
            "addmm+flat-topk": flat_topk,
        },
        # the oracle sorts all B*n entries: ~10 s per call at the full shapes
        heavy_repeats=3,
    )


def jumprelu_threshold(n: int, k: int, device: str | torch.device) -> torch.Tensor:
    """A threshold at which about ``k`` of ``n`` standard-normal pre-activations fire per row."""
    q = torch.tensor(1.0 - k / n, dtype=torch.float64)
    return torch.full((n,), float(torch.special.ndtri(q)), device=device)


def encode_jumprelu_fwd(B: int, d: int, n: int, k: int) -> Case:
    """JumpReLU inference encode (sparse codes of every latent above its threshold; the threshold
    makes about k latents fire per row) against the dense oracle (pre-activations +
    :func:`fastsae.reference.jumprelu`, a dense [B, n] code) and the ``addmm`` floor."""
    # pre-activations are ~N(0, 1): W_enc entries ~N(0, 1/d) and x ~N(0, 1)
    threshold = jumprelu_threshold(n, k, _device())

    return _encode_case(
        "encode_jumprelu_fwd",
        B,
        d,
        n,
        k,
        lambda x, W, b: ops.encode_jumprelu(x, W, b, threshold, k_cap=2 * k),
        {
            "dense-reference": lambda x, W, b: ref.jumprelu(
                ref.pre_activations(x, W, b), threshold
            ),
        },
    )


def shuffler_throughput(B: int, d: int, n: int, k: int) -> Case:
    """Hook point: the activation shuffler's throughput (see :mod:`benchmarks.pipeline`)."""
    return pipeline.shuffler_throughput(B, d)


def demo_training_run(B: int, d: int, n: int, k: int) -> Case:
    """Hook point: a short real training run on the embedded model (see
    :mod:`benchmarks.pipeline`)."""
    return pipeline.demo_training_run(suite="full" if B >= 4096 else "smoke")


def dashboard_generation(B: int, d: int, n: int, k: int, tokens: int | None = None) -> Case:
    """Hook point: feature-dashboard generation on the embedded model (see
    :mod:`benchmarks.analysis_cases`); ``tokens`` is N."""
    return analysis_cases.dashboard_generation("full" if B >= 4096 else "smoke", tokens)


def sweep_group_live(B: int, d: int, n: int, k: int, members: int = 2) -> Case:
    """Hook point: N SAEs as one group vs N separate runs, live model (see
    :mod:`benchmarks.group`)."""
    return group.group_vs_separate(B, d, n, k, members=members, cached=0)


def sweep_group_cache(B: int, d: int, n: int, k: int, members: int = 2) -> Case:
    """The same from an on-disk activation cache (see :mod:`benchmarks.group`)."""
    return group.group_vs_separate(B, d, n, k, members=members, cached=1)


def sweep_group_pretrained(B: int, d: int, n: int, k: int, members: int = 2) -> Case:
    """The same on the pretrained all-MiniLM-L6-v2 run live, where the model's forward pass
    dominates (see :mod:`benchmarks.group`)."""
    return group.group_vs_separate(B, d, n, k, members=members, pretrained=1)


def sparse_backward_shared_csr(B: int, d: int, n: int, k: int) -> Case:
    """The sparse backward of one TopK step with AuxK active (``k_aux = d / 2``, the default):
    decoder and AuxK decoder (forward + backward) and the encoder backward, with the step's
    CSR-by-latent layout shared (one sort, :mod:`fastsae.ops._csr`) against one layout built per
    reduction (three sorts, as before)."""
    from fastsae.ops import _csr

    device = _device()
    k_aux = d // 2
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(B, d, generator=g).to(device)
    W_enc = torch.randn(d, n, generator=g).to(device)
    W_dec = torch.randn(n, d, generator=g).to(device).requires_grad_(True)
    b_dec = torch.zeros(d, device=device, requires_grad=True)
    indices = torch.randint(0, n, (B, k), generator=g).to(device)
    aux_indices = torch.randint(0, n, (B, k_aux), generator=g).to(device)
    values = torch.rand(B, k, generator=g).to(device).requires_grad_(True)
    aux_values = torch.rand(B, k_aux, generator=g).to(device).requires_grad_(True)
    upstream = torch.randn(B, d, generator=g).to(device)
    grad_pre = torch.randn(B, k + k_aux, generator=g).to(device)
    both = torch.cat([indices, aux_indices], dim=1)

    def provider(backend: str, shared: bool):
        def run():
            # Fresh views each call: the registry is keyed by the tensor objects.
            main, aux = indices.view_as(indices), aux_indices.view_as(aux_indices)
            layout = _csr.SharedCSR(main, aux, n)
            if shared:
                _csr.share(layout, main, aux)
            with ops.use_backend(backend):
                out = ops.sparse_decode(values, main, W_dec, b_dec)
                torch.autograd.grad(out, (values, W_dec, b_dec), upstream)
                out = ops.sparse_decode(aux_values, aux, W_dec, b_dec)
                torch.autograd.grad(out, (aux_values, W_dec), upstream)
                _, fn = ops.implementation_of("sparse_encoder_backward")
                csr = {"csr": layout.csr("all")} if shared else {}
                fn(x, both, grad_pre, W_enc, **csr)

        return run

    backends, skipped = _backends()
    providers = {}
    for b in backends:
        providers[f"fastsae-{b}-shared"] = provider(b, True)
        providers[f"fastsae-{b}-per-reduction"] = provider(b, False)
    K = k + k_aux
    return Case(
        name="sparse_backward_shared_csr",
        mode="fwd+bwd",
        shapes={"B": B, "d": d, "n": n, "k": k, "k_aux": k_aux},
        providers=providers,
        skipped=skipped,
        # two decodes (forward, grad_values, grad_W_dec) and grad_W_enc
        flops=6 * B * K * d + 2 * B * K * d,
        bytes=4 * (4 * B * K * d + 2 * n * d),
        baseline=f"fastsae-{backends[0]}-per-reduction",
        items=B,
    )


def csr_layouts_per_step(B: int, d: int, n: int, k: int) -> Case:
    """Only the CSR-by-latent layouts of one TopK step with AuxK active (``k_aux = d / 2``): the
    shared one (one sort of the main and AuxK ids together, the main and AuxK layouts derived from
    it; on CPU the parts sort their own ids unless ``_csr.DERIVE_PARTS_ON_CPU``, which measured
    faster) against one sort per reduction (main, AuxK, both), as before. The part of
    ``sparse_backward_shared_csr`` that sharing changes."""
    from fastsae.ops import _csr

    device = _device()
    k_aux = d // 2
    g = torch.Generator(device="cpu").manual_seed(3)
    indices = torch.randint(0, n, (B, k), generator=g).to(device)
    aux_indices = torch.randint(0, n, (B, k_aux), generator=g).to(device)
    both = torch.cat([indices, aux_indices], dim=1)

    def shared():
        layout = _csr.SharedCSR(indices, aux_indices, n)
        return [layout.csr(part) for part in ("main", "aux", "all")]

    def per_reduction():
        return [_csr.csr_by_latent(ids, n) for ids in (indices, aux_indices, both)]

    return Case(
        name="csr_layouts_per_step",
        mode="bwd",
        shapes={"B": B, "d": d, "n": n, "k": k, "k_aux": k_aux},
        providers={"shared": shared, "per-reduction": per_reduction},
        skipped={},
        flops=0,
        # int64 ids sorted and written: entries and rows of each layout
        bytes=8 * 3 * 2 * B * (k + k_aux),
        baseline="per-reduction",
        items=B,
    )


Builder = Callable[..., Case]
REGISTRY: dict[str, Builder] = {
    "sparse_decode_fwd_bwd": sparse_decode_fwd_bwd,
    "encoder_backward": encoder_backward,
    "sparse_backward_shared_csr": sparse_backward_shared_csr,
    "csr_layouts_per_step": csr_layouts_per_step,
    "encode_topk_fwd": encode_topk_fwd,
    "encode_topk_strategies_fwd": encode_topk_strategies_fwd,
    "encode_batch_topk_fwd": encode_batch_topk_fwd,
    "encode_jumprelu_fwd": encode_jumprelu_fwd,
    "trainer_step": trainer_step,
    "shuffler_throughput": shuffler_throughput,
    "demo_training_run": demo_training_run,
    "dashboard_generation": dashboard_generation,
    "sweep_group_live": sweep_group_live,
    "sweep_group_cache": sweep_group_cache,
    "sweep_group_pretrained": sweep_group_pretrained,
}


def plan(
    suite: str, only: list[str] | None = None, override: dict[str, int] | None = None
) -> list[tuple[str, dict[str, int]]]:
    """``(case name, shapes)`` for every case of ``suite``, optionally only the named ones, with
    ``override`` replacing some of the suite's sizes (B, d, n, k)."""
    size = {**SIZES[suite], **(override or {})}
    out = []
    for name in REGISTRY:
        if only and name not in only:
            continue
        if name == "encode_topk_fwd" and suite == "full" and not override:
            out += [(name, {**size, "n": n}) for n in (16384, 65536)]
        elif name == "dashboard_generation" and suite == "full" and not override:
            out += [(name, {**size, "tokens": t}) for t in (100_000, 1_000_000)]
        elif name.startswith("sweep_group_"):
            out += [(name, {**size, "members": m}) for m in group.SIZES[suite]["members"]]
        else:
            out.append((name, dict(size)))
    return out


def cases(
    suite: str, only: list[str] | None = None, override: dict[str, int] | None = None
) -> Iterator[tuple[str, Callable[[], Case]]]:
    """Every case of ``suite`` (``smoke`` or ``full``) as ``(name, build)``; call ``build()``
    just before measuring and drop the case afterwards."""
    for name, shapes in plan(suite, only, override):
        yield name, (lambda name=name, shapes=shapes: REGISTRY[name](**shapes))
