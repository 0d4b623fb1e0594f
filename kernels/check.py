"""Compile every fastsae kernel for real GPU targets, without a GPU: ``python -m fastsae.kernels.check``.

For each launch a kernel module makes (its ``*_plan`` helper, fed small CPU example tensors whose
strides and alignments match a real SAE step), for ``sm_80`` and ``sm_90`` and for fp32 and bf16
inputs, this builds the same signature Triton's JIT would build at launch (pointer dtypes, ints
equal to 1 folded into constants, 16-divisibility hints), compiles it with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``, and runs the matching
``ptxas -v`` on the PTX to read registers and spills (``metadata.n_regs`` is only filled in after a
launch on a device), and reads the tensor-core instruction a ``tl.dot`` became from the PTX
(``wgmma.bf16`` on sm_90, ``mma.bf16`` on sm_80 for bf16 operands: the bf16 path the interpreter
cannot run, since it widens bf16 dots to fp32). It prints one table row per compile and exits
non-zero if any compile fails.

Supported Triton: 3.6 (what torch 2.11 pins, on the GPU machines) to 3.9 (this venv). CI runs the
check under both (``scripts/compile_check_triton36.sh`` puts a 3.6 wheel first on ``PYTHONPATH``);
the header line names the version that produced a table.

Must run without ``TRITON_INTERPRET``: under the interpreter ``@triton.jit`` produces Python
functions with nothing to compile. Run as a script with the variable set, it re-executes itself
without it (even if Triton was already imported); imported with it set, it refuses.
"""

from __future__ import annotations

import os
import sys


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false")


if _interpreting():
    if __name__ == "__main__":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "fastsae.kernels.check", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)
    raise ImportError("fastsae.kernels.check needs real compilation: unset TRITON_INTERPRET")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastsae.kernels import (  # noqa: E402
    csr,
    encode_topk,
    encode_topk_filtered,
    slab_topk,
    sparse_decode,
)

# Targets: A100 (sm_80) and H100 (sm_90; Triton emits PTX for sm_90a there).
CAPABILITIES = (80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Feature widths whose tiles differ: 64 (BLOCK_D=64, small test SAEs) and 2304 (BLOCK_D=128, the
# tile every real width >= 128 uses: 512, 768, 2304, 4096 all specialise identically).
WIDTHS = (64, 2304)
# Example batch: only the *values* of sizes and strides matter (== 1, divisible by 16 or not), so
# a small B and n with the same divisibility as real ones (powers of two) stand in for them.
EXAMPLE_B, EXAMPLE_K, EXAMPLE_N = 32, 32, 256


@dataclass(frozen=True)
class Case:
    """One launch to compile: ``name`` for the table, ``plan`` builds ``(kernel, grid, kwargs)``."""

    name: str
    width: int
    dtype: str
    plan: Callable
    # Capabilities this launch happens on (the filtered kernel's TMA configurations are what an
    # sm_90 launch gets, its pointer ones what an sm_80 launch gets).
    targets: tuple[int, ...] = CAPABILITIES


def _examples(d: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    B, K, N = EXAMPLE_B, EXAMPLE_K, EXAMPLE_N
    values = torch.rand(B, K, generator=g).to(dtype)
    indices = torch.randint(0, N, (B, K), generator=g)
    W_dec = torch.randn(N, d, generator=g).to(dtype)
    b_dec = torch.zeros(d, dtype=dtype)
    rows = torch.zeros(B, d, dtype=dtype)  # stands for out, grad_out and x alike
    return values, indices, W_dec, b_dec, rows


def _cases() -> Iterator[Case]:
    """Every (kernel, specialisation) that the launchers in fastsae.kernels make."""
    for d in WIDTHS:
        for dname, dtype in DTYPES.items():

            def decode_fwd(d=d, dtype=dtype):
                values, indices, W_dec, b_dec, out = _examples(d, dtype)
                return sparse_decode._fwd_plan(values, indices, W_dec, b_dec, out)

            def decode_grad_values(d=d, dtype=dtype):
                values, indices, W_dec, _, grad_out = _examples(d, dtype)
                return sparse_decode._bwd_plan(grad_out, indices, W_dec, torch.empty_like(values))

            def decode_grad_W(d=d, dtype=dtype, step=0, hot=False):
                values, indices, W_dec, _, grad_out = _examples(d, dtype)
                if hot:  # one latent hit by every entry: its segment is reduced in chunks
                    values, grad_out = values.repeat(4, 1), grad_out.repeat(4, 1)
                    indices = torch.zeros_like(values, dtype=torch.int64)
                layout = csr.csr_by_latent(indices, W_dec.shape[0])
                out = torch.empty_like(W_dec)
                return csr.segment_reduce_plans(layout, values, grad_out, out)[step]

            def encoder_grad_W(d=d, dtype=dtype):
                grad_pre, indices, W_t, _, x = _examples(d, dtype)
                layout = csr.csr_by_latent(indices, W_t.shape[0])
                out = torch.empty_like(W_t)
                b = torch.empty(W_t.shape[0], dtype=dtype)
                return csr.segment_reduce_plans(layout, grad_pre, x, out, b)[0]

            def hot_chunks(d=d, dtype=dtype):
                return decode_grad_W(d, dtype, step=0, hot=True)

            def hot_merge(d=d, dtype=dtype):
                return decode_grad_W(d, dtype, step=2, hot=True)

            def encoder_grad_x_latent_major(d=d, dtype=dtype):
                # W_enc = buf.T for a contiguous [n, d_in] buf: W_enc.T is buf itself.
                grad_pre, indices, buf, _, out = _examples(d, dtype)
                return sparse_decode._fwd_plan(grad_pre, indices, buf.T.T, None, out)

            def encoder_grad_x_row_major(d=d, dtype=dtype):
                # W_enc a contiguous [d_in, n]: its columns are strided by n.
                grad_pre, indices, W_t, _, out = _examples(d, dtype)
                W_enc = W_t.T.contiguous()
                return sparse_decode._fwd_plan(grad_pre, indices, W_enc.T, None, out)

            yield Case("sparse_decode fwd", d, dname, decode_fwd)
            yield Case("sparse_decode bwd grad_values", d, dname, decode_grad_values)
            yield Case("segment_reduce (grad_W_dec)", d, dname, decode_grad_W)
            yield Case("segment_reduce (grad_W_enc, grad_b_enc)", d, dname, encoder_grad_W)
            yield Case("segment_reduce hot-latent chunks", d, dname, hot_chunks)
            yield Case("segment_reduce hot-latent merge", d, dname, hot_merge)
            yield Case("enc grad_x, W_enc=[n,d_in].T", d, dname, encoder_grad_x_latent_major)
            yield Case("enc grad_x, W_enc=[d_in,n]", d, dname, encoder_grad_x_row_major)
    # The fused encode + top-k: every specialisation its launcher makes (k, threshold mode,
    # AuxK, strategies, both W_enc layouts), fp32 and bf16.
    for cfg in encode_topk.compile_configs():
        yield Case(cfg.name, cfg.d_in, cfg.dtype, cfg.plan)
    # The threshold-filtered fused kernel (128 x 128 tiles, TMA, persistent grid): its
    # configurations with and without TMA descriptors.
    for name, dname, plan, targets in encode_topk_filtered.compile_configs():
        yield Case(name, 2304, dname, plan, targets)
    # The streaming top-k over cuBLAS slabs: k up to 2048, the threshold and AuxK passes. It
    # reads scores, not d_in-wide rows: the width column shows 0.
    for name, dname, plan in slab_topk.compile_configs():
        yield Case(name, 0, dname, plan)


def _source(kernel, kwargs: dict) -> tuple[ASTSource, dict, str]:
    """The ASTSource Triton's JIT would compile for ``kernel[grid](**kwargs)``."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = kwargs[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[param.name] = ty
        if ty == "constexpr":  # an int equal to 1: the JIT folds it into the kernel
            constexprs[param.name] = value
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in kwargs.items() if k not in signature}
    meta = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper())
    meta = meta.replace("triton.language.", "").replace("ACC_DTYPE=", "acc=")
    return ASTSource(kernel, signature, constexprs, attrs), options, meta


def _ptxas_stats(ptx: str, capability: int) -> tuple[int, int]:
    """``(registers, spill-store bytes)`` from ``ptxas -v`` for this capability."""
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-v", f"--gpu-name={arch}", src, "-o", src + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return int(regs.group(1)), int(spills.group(1))


_MMA = re.compile(
    r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]*?(m\d+n\d+k\d+)\.[\w.]*?(bf16|f16|tf32|f64)\b"
)


def _tensor_core_op(ptx: str) -> str:
    """``wgmma.bf16:m64n128k16`` / ``mma.tf32:m16n8k8`` ...: the MMA instruction, operand type
    and instruction shape in ``ptx`` (the shape says how much of the tile one wgmma covers), or
    ``-`` when the kernel uses no tensor cores (the gather kernels)."""
    found = sorted({(op.split(".")[0], ty, shape) for op, shape, ty in _MMA.findall(ptx)})
    return ",".join(f"{op}.{ty}:{shape}" for op, ty, shape in found) or "-"


def _compile_one(job: tuple[int, int]) -> tuple[str, str]:
    """Compile case number ``job[0]`` for capability ``job[1]``; return (table row, error)."""
    index, capability = job
    case = list(_cases())[index]
    kernel_name = "?"
    try:
        kernel, _grid, kwargs = case.plan()
        kernel_name = kernel.fn.__name__
        src, options, meta = _source(kernel, kwargs)
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
        regs, spills = _ptxas_stats(compiled.asm["ptx"], capability)
        shared = compiled.metadata.shared
        mma = _tensor_core_op(compiled.asm["ptx"])
        if "cp.async.bulk.tensor" in compiled.asm["ptx"]:
            mma += "+tma"  # the tiles arrive by TMA copies (tensor descriptors)
        row = (
            f"{kernel_name:<28} {case.name:<40} {case.width:>5} sm_{capability:<3} "
            f"{case.dtype:<5} {regs:>4} {spills:>6} {shared:>6} {mma:<22} {meta}"
        )
        return row, ""
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit is non-zero
        return "", f"{kernel_name} {case.name} d={case.width} sm_{capability} {case.dtype}: {e!r}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument(
        "--no-spills-on",
        type=int,
        action="append",
        default=[],
        metavar="CAP",
        help="fail if any kernel spills on this capability (e.g. 90)",
    )
    parser.add_argument(
        "--only", default="", help="compile only the launches whose label contains this text"
    )
    parser.add_argument(
        "--target",
        type=int,
        action="append",
        metavar="CAP",
        help="compile only for this capability (repeatable; default: 80 and 90)",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

    start = time.time()
    n_cases = len(list(_cases()))
    cases = list(_cases())
    picked = [i for i in range(n_cases) if args.only in cases[i].name]
    capabilities = args.target or CAPABILITIES
    jobs = [(i, cap) for cap in capabilities for i in picked if cap in cases[i].targets]

    header = (
        f"{'kernel':<28} {'launch':<40} {'d':>5} {'target':<6} {'dtype':<5} {'regs':>4} "
        f"{'spills':>6} {'shared':>6} {'mma':<22} meta"
    )
    print(f"triton {triton.__version__} (from {os.path.dirname(triton.__file__)})")
    print(header)
    print("-" * len(header), flush=True)
    errors, results = [], []
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            # spawn, not fork: building the cases runs torch ops, and a forked child of a process
            # whose OpenMP pool has started can deadlock on the pool's locks (it did here).
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(args.jobs, mp_context=context))
            done = pool.map(_compile_one, jobs)
        else:
            done = map(_compile_one, jobs)
        # Rows are printed as they arrive (in job order), so a run cut short keeps its rows.
        for job, result in zip(jobs, done, strict=True):
            results.append((job, result))
            _, error = result
            if error:
                errors.append(error)
            else:
                print(result[0], flush=True)
    for (index, capability), (row, error) in results:
        if error:
            continue
        spills = int(row.split()[-4])  # ... regs spills shared mma meta
        if capability in args.no_spills_on and spills:
            errors.append(f"{row.split()[0]} case {index} spills {spills} B on sm_{capability}")
    print(f"\n{len(results) - len(errors)}/{len(results)} compiled in {time.time() - start:.1f} s")
    print(
        "spills = ptxas spill-store bytes; shared = bytes of shared memory per program; "
        "mma = tensor-core instruction.operand type:shape in the PTX (+tma: TMA tile copies)"
    )
    for error in errors:
        print(f"FAILED {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
