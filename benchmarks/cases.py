"""The registry of benchmark cases. Each builder returns a :class:`Case` for one size."""

from __future__ import annotations

import torch

from benchmarks.harness import Case
from fastsae import ops
from fastsae import reference as ref

SIZES = {
    # seconds on two CPU cores
    "smoke": {"B": 256, "d": 64, "n": 1024, "k": 8},
    # the shapes named in the kernel issues (CPU)
    "full": {"B": 4096, "d": 768, "n": 16384, "k": 32},
}


def _backends() -> list[str]:
    names = ["torch"]
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401

            names.insert(0, "triton")
        except ImportError:
            pass
    return names


def sparse_decode_fwd_bwd(B: int, d: int, n: int, k: int) -> Case:
    """Sparse decode forward + backward (all three gradients) against a dense decode (scatter the
    codes into [B, n], then matmul) with autograd."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
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

    providers = {f"fastsae-{b}": fastsae_provider(b) for b in _backends()}
    providers["dense"] = dense
    return Case(
        name="sparse_decode_fwd_bwd",
        mode="fwd+bwd",
        shapes={"B": B, "d": d, "n": n, "k": k},
        providers=providers,
        # forward, grad_values and grad_W_dec are each 2*B*k*d FLOPs
        flops=6 * B * k * d,
        # three gathers/scatters of B*k rows of d, read g twice, write grad_W_dec [n, d] (fp32)
        bytes=4 * (3 * B * k * d + 2 * B * d + n * d),
        baseline="dense",
    )


def encoder_backward(B: int, d: int, n: int, k: int) -> Case:
    """Encoder backward from a sparse grad_pre [B, k] against dense autograd through
    pre = x @ W_enc + b_enc (the dense gradient is scattered to [B, n] first, as a dense TopK
    implementation does)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
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

    providers = {f"fastsae-{b}": fastsae_provider(b) for b in _backends()}
    providers["dense-autograd"] = dense
    return Case(
        name="encoder_backward",
        mode="bwd",
        shapes={"B": B, "d": d, "n": n, "k": k},
        providers=providers,
        flops=2 * B * k * d,
        # read x and the sparse gradient, write grad_W_enc [d, n] (fp32)
        bytes=4 * (B * d + n * d + 2 * B * k),
        baseline="dense-autograd",
    )


def encode_topk_fwd(B: int, d: int, n: int, k: int) -> Case:
    """Encode + top-k (inference: no grad) against ``addmm`` + ``torch.topk`` on the dense
    pre-activations, and against the ``addmm`` alone: the physical floor of an exact TopK."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(B, d, generator=g).to(device)
    W_enc = (torch.randn(d, n, generator=g) / d**0.5).to(device)
    b_enc = torch.zeros(n, device=device)

    def fastsae_provider(backend: str):
        def run():
            with torch.no_grad(), ops.use_backend(backend):
                ops.encode_topk(x, W_enc, b_enc, k)

        return run

    def addmm_topk():
        torch.topk(torch.addmm(b_enc, x, W_enc), k, dim=-1)

    def addmm():
        torch.addmm(b_enc, x, W_enc)

    providers = {f"fastsae-{b}": fastsae_provider(b) for b in _backends()}
    providers["addmm+topk"] = addmm_topk
    providers["addmm-floor"] = addmm
    return Case(
        name="encode_topk_fwd",
        mode="fwd",
        shapes={"B": B, "d": d, "n": n, "k": k},
        providers=providers,
        flops=2 * B * d * n,
        # read x and W_enc, write B*k values and indices; the [B, n] matrix is never written
        bytes=4 * (B * d + d * n + 2 * B * k),
        baseline="addmm-floor",
    )


def trainer_step(B: int, d: int, n: int, k: int) -> Case:
    """One full ``Trainer.step`` (forward, AuxK bookkeeping, backward, decoder projection, Adam,
    renormalisation) on random activations, against the floor of an exact TopK step measured in
    the same run: one encoder ``addmm``, one ``torch.topk`` and one Adam step over the same
    parameters."""
    from fastsae.train import TrainConfig, Trainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(B, d, generator=g).to(device)
    trainers = {}
    for backend in _backends():
        cfg = TrainConfig(
            d_in=d,
            d_sae=n,
            k=k,
            batch_size=B,
            buffer_tokens=B,
            total_tokens=10**9,
            backend=backend,
            device=device,
            warmup_steps=0,
            progress=False,
        )
        trainers[backend] = Trainer(cfg)

    W_enc = torch.randn(d, n, generator=g).to(device) / d**0.5
    b_enc = torch.zeros(n, device=device)
    params = [torch.nn.Parameter(t) for t in (W_enc, b_enc, torch.randn(n, d), torch.zeros(d))]
    for p in params:
        p.grad = torch.randn_like(p)
    adam = torch.optim.Adam(params, lr=1e-9, fused=True)

    def floor():
        pre = torch.addmm(b_enc, x, W_enc)
        torch.topk(pre, k, dim=-1)
        del pre
        adam.step()

    providers = {f"fastsae-{b}": (lambda t=t: t.step(x)) for b, t in trainers.items()}
    providers["floor(addmm+topk+adam)"] = floor
    return Case(
        name="trainer_step",
        mode="step",
        shapes={"B": B, "d": d, "n": n, "k": k},
        providers=providers,
        # TopK step cost model (PRIOR-ART): 2*B*d*n for the encoder + 8*B*k*d for the sparse rest
        flops=2 * B * d * n + 8 * B * k * d,
        # W_enc read by the GEMM, Adam's ~28 bytes per parameter (fp32 param, grad, 2 moments)
        bytes=4 * d * n + 28 * (2 * d * n + n + d),
        baseline="floor(addmm+topk+adam)",
    )


def cases(suite: str) -> list[Case]:
    """Every case of ``suite`` (``smoke`` or ``full``)."""
    size = SIZES[suite]
    out = [sparse_decode_fwd_bwd(**size), encoder_backward(**size)]
    widths = [size["n"]] if suite == "smoke" else [16384, 65536]
    out += [encode_topk_fwd(size["B"], size["d"], n, size["k"]) for n in widths]
    out.append(trainer_step(**size))
    return out
