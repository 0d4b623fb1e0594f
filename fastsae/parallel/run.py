"""The run behind ``torchrun --nproc-per-node N -m fastsae.train --parallel MODE ...``.

The same order of events as :mod:`fastsae.train.run`, on every rank:

1. join the process group and build the ``(dp, latent)`` mesh (:func:`init_layout`);
2. open the data (:class:`RankData`: each data rank reads its own slice);
3. the per-rank memory estimate; every rank refuses together if any rank's shard cannot fit;
4. the loop: :class:`DistributedTrainer` steps; rank 0 writes ``metrics.jsonl``; sharded
   checkpoints every ``checkpoint_every_tokens`` (collective); SIGINT/SIGTERM on any rank stops
   every rank after the same step;
5. at the end: a checkpoint; rank 0 writes the consolidated SAE (``OUT/sae``, SAELens v6) from it
   and runs the final evaluation.

A rank that dies makes its peers' next collective fail (at once on gloo, within the process
group timeout otherwise): each survivor raises :class:`PeerFailure`, which names itself, the
operation and the last checkpoint, and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastsae.parallel.checkpoint import export_sae, is_sharded, load_sharded, save_sharded
from fastsae.parallel.comm import all_reduce, barrier
from fastsae.parallel.data import RankData
from fastsae.parallel.memory import estimate_parallel
from fastsae.parallel.mesh import PeerFailure, init_layout, peer_failure
from fastsae.parallel.trainer import DistributedTrainer
from fastsae.train.checkpoint import CheckpointError, latest_checkpoint
from fastsae.train.config import TrainConfig
from fastsae.train.memory import PLAN_SHARE, available_bytes

__all__ = ["run_parallel"]

GiB = 2**30


def run_parallel(cfg: TrainConfig, *, resume=None, stop_after_steps=None, log=print):
    """Train ``cfg`` on this rank of a torchrun job (``cfg.parallel`` != ``none``)."""
    from fastsae.train.run import RunResult

    layout = init_layout(cfg.parallel, latent_parallel=cfg.latent_parallel, device=cfg.device)
    say = log if layout.is_main else (lambda *a, **k: None)
    out_dir = None
    try:
        cfg = _agree_out_dir(cfg)
        out_dir = Path(cfg.out_dir)
        say(layout.describe())
        result = _run(cfg, layout, resume, stop_after_steps, say)
        return RunResult(**result)
    except PeerFailure as e:
        kept = latest_checkpoint(out_dir) if out_dir is not None else None
        e.args = (f"{e}; last checkpoint: {kept or 'none written yet'}",)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _agree_out_dir(cfg: TrainConfig) -> TrainConfig:
    """Rank 0's default ``out_dir`` (a time stamp) for every rank."""
    if cfg.out_dir is not None:
        return cfg
    name = [time.strftime("runs/%Y%m%d-%H%M%S")]
    try:
        dist.broadcast_object_list(name, src=0)
    except (RuntimeError, dist.DistError) as e:
        raise peer_failure("broadcast of out_dir", e) from e
    return dataclasses.replace(cfg, out_dir=name[0])


def _run(cfg, layout, resume, stop_after_steps, say) -> dict:
    from fastsae.train.run import _stop_on_signals, resolve_resume

    out_dir = Path(cfg.out_dir)
    resume_path = resolve_resume(resume) if resume is not None else None
    if resume_path is not None and not is_sharded(resume_path):
        raise CheckpointError(
            f"--resume {resume_path}: not a sharded checkpoint (parallel runs write those; a "
            "one-process checkpoint resumes without --parallel)"
        )
    if resume_path is None and latest_checkpoint(out_dir) is not None:
        raise ValueError(
            f"out_dir={str(out_dir)!r} already holds checkpoints; continue it with --resume "
            f"{out_dir}, or choose another --out-dir"
        )
    data = RankData(cfg, layout=layout, device=layout.device, log=say)
    try:
        d_in, d_out = data.d_in, data.d_out or data.d_in
        mem = estimate_parallel(cfg, d_in, d_out, layout.dp_size, layout.latent_size)
        say(f"memory estimate per rank: {mem.describe()}")
        free = available_bytes(layout.device)
        world = None if layout.world == 1 else dist.group.WORLD
        if mem.average:
            # Every rank drops the weight average if one must (DistributedTrainer decides alike).
            over = torch.tensor([float(mem.device_total > PLAN_SHARE * free)], device=layout.device)
            if all_reduce(over, world, "max").item():
                say(
                    f"the weight average ({mem.average / GiB:.1f} GiB per rank) does not fit on "
                    "every rank: the run trains without it and serves the raw weights"
                )
                mem.average = 0
        short = torch.tensor([float(mem.device_total > free)], device=layout.device)
        if all_reduce(short, world, "max").item():
            raise MemoryError(
                f"parallel={layout.mode} on {layout.world} ranks needs about "
                f"{mem.device_total / GiB:.1f} GiB per rank ({mem.describe()}) but a rank has "
                f"less free; add latent ranks, lower d_sae or batch_size"
            )
        trainer = DistributedTrainer(
            cfg,
            layout,
            d_in=d_in,
            d_out=d_out,
            hook_name=cfg.hook,
            hook_name_out=cfg.hook_out,
            model_name=data.model_name,
        )
        if resume_path is not None:
            data.load_state_dict(load_sharded(trainer, resume_path))
            say(f"resumed from {resume_path} at step {trainer.step_count}")
        return _loop(cfg, layout, trainer, data, out_dir, stop_after_steps, say, _stop_on_signals)
    finally:
        data.close()


def _loop(cfg, layout, trainer, data, out_dir, stop_after_steps, say, stop_on_signals) -> dict:
    if layout.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    every = cfg.checkpoint_every_tokens
    next_checkpoint = (trainer.tokens // every + 1) * every if every else 0
    first_step = trainer.step_count
    status = "done"
    world = None if layout.world == 1 else dist.group.WORLD
    metrics_file = open(out_dir / "metrics.jsonl", "a") if layout.is_main else None  # noqa: SIM115
    try:
        with stop_on_signals() as stop:
            while trainer.step_count < cfg.total_steps:
                x, y = data.next_batch()
                m = trainer.step(x, y)
                if metrics_file is not None and (
                    trainer.step_count % cfg.log_every == 0 or trainer.step_count == cfg.total_steps
                ):
                    metrics_file.write(json.dumps(m) + "\n")
                    metrics_file.flush()
                if next_checkpoint and trainer.tokens >= next_checkpoint:
                    save_sharded(trainer, out_dir, data_state=data.state_dict())
                    next_checkpoint = (trainer.tokens // every + 1) * every
                # Every rank leaves after the same step: a signal seen by any rank counts.
                flag = float(stop["signal"] is not None) + float(
                    stop_after_steps is not None
                    and trainer.step_count - first_step >= stop_after_steps
                )
                flag_t = torch.tensor([flag], device=layout.device)
                if all_reduce(flag_t, world, "max").item():
                    status = "interrupted"
                    break
        path = save_sharded(trainer, out_dir, data_state=data.state_dict())
    finally:
        if metrics_file is not None:
            metrics_file.close()
    if status == "interrupted":
        say(f"stopped at step {trainer.step_count}; checkpoint: {path}")
        say(
            f"resume with: torchrun --nproc-per-node N -m fastsae.train --resume {out_dir} "
            "(any N; --parallel may change too)"
        )
        return {"status": status, "out_dir": str(out_dir), "checkpoint": str(path)}
    final: dict = {}
    if layout.is_main:
        sae_dir = export_sae(path, out_dir / "sae")
        final = _evaluate(sae_dir, data, layout.device)
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    barrier("end of run")
    return {"status": status, "out_dir": str(out_dir), "sae_dir": str(out_dir / "sae"), **final}


def _evaluate(sae_dir: Path, data, device) -> dict:
    """Reconstruction metrics of the exported SAE on the held-out data (rank 0)."""
    from fastsae.evaluate import reconstruction_metrics
    from fastsae.io import load

    sae = load(sae_dir, device=device)
    start = time.perf_counter()
    metrics = reconstruction_metrics(sae, data.eval_batches())
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics
