"""Run a function on ``world`` local processes joined by ``torch.distributed`` (gloo), bounded in
time: the tests and the benchmark use this instead of a torchrun subprocess (the same
environment variables, a fraction of the start-up time).

Also :func:`train_synthetic`: ``steps`` steps of a :class:`DistributedTrainer` on seeded
synthetic batches, writing this rank's slab, bytes communicated and step times to a file; and
:func:`train_single` for the one-process result on the same batches.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

__all__ = ["free_port", "spawn", "synthetic_batch", "train_single", "train_synthetic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, *args: Any, timeout_s: float = 120.0, env: dict | None = None) -> None:
    """Run ``fn(*args)`` on ``world`` spawned processes; raise if any fails or the whole takes
    longer than ``timeout_s`` (every process is then killed)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, fn, args, dict(env or {})), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in alive:
        procs[r].kill()
        procs[r].join(5)
    if alive:
        raise TimeoutError(f"ranks {alive} of {world} still running after {timeout_s} s")
    failed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if failed:
        raise RuntimeError(f"ranks failed (rank: exit code): {failed}")


def synthetic_batch(step: int, batch: int, d: int, seed: int = 0) -> torch.Tensor:
    """A seeded ``[batch, d]`` batch with structure (a few strong directions plus noise)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    basis = torch.randn(8, d, generator=torch.Generator().manual_seed(seed))
    coef = torch.relu(torch.randn(batch, 8, generator=g)) * 3
    return (coef @ basis + 0.3 * torch.randn(batch, d, generator=g) + 1.0).float()


def train_single(cfg_dict: dict, steps: int, seed: int = 0):
    """One process, ``steps`` steps on the global batches: the trainer."""
    from fastsae.train.config import TrainConfig
    from fastsae.train.trainer import Trainer

    cfg = TrainConfig(**cfg_dict)
    trainer = Trainer(cfg)
    for s in range(steps):
        trainer.step(synthetic_batch(s, cfg.batch_size, cfg.d_in, seed))
    return trainer


def train_synthetic(mode: str, cfg_dict: dict, steps: int, out_dir: str, seed: int = 0) -> None:
    """Per rank: ``steps`` steps on this rank's slice of the seeded global batches; writes
    ``slab-<rank>.safetensors`` (the slab's state, Adam moments, counters) and ``stats-<rank>.json``."""
    import torch.distributed as dist

    from fastsae.parallel.comm import COUNTER, all_reduce
    from fastsae.parallel.mesh import init_layout
    from fastsae.parallel.trainer import DistributedTrainer
    from fastsae.train.config import TrainConfig

    cfg = TrainConfig(**cfg_dict)
    layout = init_layout(mode, latent_parallel=cfg.latent_parallel, device="cpu")
    trainer = DistributedTrainer(cfg, layout)
    b = cfg.batch_size // layout.dp_size
    times, comm, n_dead = [], [], []
    for s in range(steps):
        x = synthetic_batch(s, cfg.batch_size, cfg.d_in, seed)[layout.dp_rank * b :][:b]
        dead = (trainer.since_fired >= cfg.dead_after_tokens).sum().reshape(1)
        n_dead.append(int(all_reduce(dead, layout.latent_group).item()))
        COUNTER.clear()
        dist.barrier()
        t0 = time.perf_counter()
        metrics = trainer.step(x)
        times.append(time.perf_counter() - t0)
        comm.append(sum(COUNTER.values()))
    # safetensors, flat names (no pickle is ever written or read): the test consolidates them.
    state = {f"sae/{k}": v for k, v in trainer.scaled_sae.state_dict().items()}
    for name, p in trainer.scaled_sae.named_parameters():
        state[f"exp_avg_sq/{name}"] = trainer.optimizer_state(p)["exp_avg_sq"]
    state["since_fired"] = trainer.since_fired
    state["fire_counts"] = trainer.fire_counts
    state["in_scale"] = trainer.in_scale.reshape(1)
    state["offset"] = torch.tensor([trainer.shard.offset, trainer.shard.count])
    out = Path(out_dir)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        str(out / f"slab-{layout.rank}.safetensors"),
    )
    stats = {
        "step_s": times,
        "bytes": comm,
        "n_dead": n_dead,
        "last": metrics,
        "rank": layout.rank,
        "dp": layout.dp_size,
        "latent": layout.latent_size,
    }
    (out / f"stats-{layout.rank}.json").write_text(json.dumps(stats))
