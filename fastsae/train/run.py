"""The training run behind ``python -m fastsae.train``: data, loop, evaluation, checkpoints, files.

Order of events (each failure is reported before the expensive steps that follow it):

1. the config is validated (``TrainConfig.__post_init__``); ``--resume`` is checked (the
   checkpoint reads, and no flag changes the SAE or its data: ``preflight.check_resume_config``);
2. the device, dtype and backend are checked, and the memory estimate (device and host) is
   printed where the widths are known without the model; the run refuses if it cannot fit;
3. ``out_dir`` is created and locked (``outdir.locked_run_directory``): a second run into it is
   refused;
4. the model and data are opened (an unknown hook is reported with the nearest valid names), and
   the memory check runs with the real widths if it could not before;
5. the loop: ``Trainer.step`` on shuffled activations, ``metrics.jsonl``, a tqdm bar, an
   evaluation every ``eval_every`` steps, a checkpoint every ``checkpoint_every_tokens``;
6. SIGINT/SIGTERM: a checkpoint, then a clean exit; a NaN/inf loss: stop, keep the last good
   checkpoint, name the step;
7. at the end: a checkpoint, the SAE in SAELens v6 format (``OUT/sae``), the final evaluation,
   plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fastsae.train.checkpoint import (
    latest_checkpoint,
    latest_good_checkpoint,
    load_checkpoint,
    read_checkpoint,
    remove_stale_run_temporaries,
    save_checkpoint,
)
from fastsae.train.config import TrainConfig
from fastsae.train.outdir import locked_run_directory, truncate_metrics, write_errors
from fastsae.train.preflight import (
    absolute_paths,
    check_device_support,
    check_memory,
    check_resume_config,
    peek_dims,
    run_directory_of,
)
from fastsae.train.trainer import NonFiniteLossError, Trainer, resolve_device

__all__ = ["RunResult", "run", "resolve_resume"]


class RunResult(dict):
    """Final metrics plus ``out_dir``, ``sae_dir`` and ``status`` (``done`` or ``interrupted``)."""


def resolve_resume(resume: str | Path) -> Path:
    """``--resume`` accepts a run directory (its newest checkpoint) or a checkpoint directory."""
    path = Path(resume)
    if (path / "state.json").exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise ValueError(
            f"--resume {resume}: no checkpoint found (looked in {path / 'checkpoints'})"
        )
    return found


@contextmanager
def _stop_on_signals():
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step."""
    flag = {"signal": None}
    previous = {}

    def handler(signum, frame):
        flag["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    stop_after_steps: int | None = None,
    log=print,
) -> RunResult:
    """Train ``cfg`` end to end; see the module docstring.

    ``resume``: a run directory (its newest checkpoint) or a checkpoint directory. The run
    continues in the directory the checkpoint lies in, whatever ``out_dir`` it was saved with, and
    ``cfg`` may differ from the saved config only in :data:`~fastsae.train.preflight.RESUME_CHANGEABLE`.

    ``stop_after_steps``: leave (with a checkpoint, status ``interrupted``) after that many steps
    in this session, e.g. to fit a time-sliced job; ``--resume`` continues exactly.
    """
    if cfg.parallel != "none":  # torchrun: one process of a data/latent-parallel job
        from fastsae.parallel.run import run_parallel

        return run_parallel(cfg, resume=resume, stop_after_steps=stop_after_steps, log=log)
    from fastsae.train.data import open_data

    resume_path = resolve_resume(resume) if resume is not None else None
    if resume_path is not None:
        # A truncated checkpoint, or a flag that conflicts with it, is reported before anything loads.
        meta, _ = read_checkpoint(resume_path)
        saved = TrainConfig.from_dict(meta["config"])
        cfg = check_resume_config(cfg, saved, run_directory_of(resume_path))
    elif cfg.out_dir is None:
        cfg = dataclasses.replace(cfg, out_dir=time.strftime("runs/%Y%m%d-%H%M%S"))
    cfg = absolute_paths(cfg)
    device = resolve_device(cfg.device)
    check_device_support(cfg, device)
    dims = peek_dims(cfg)
    if dims is not None:
        check_memory(cfg, *dims, device, log)
    with locked_run_directory(cfg.out_dir) as out_dir:
        if resume_path is None and latest_checkpoint(out_dir) is not None:
            raise ValueError(
                f"out_dir={str(out_dir)!r} already holds checkpoints; continue it with --resume "
                f"{out_dir}, or choose another --out-dir"
            )
        data = open_data(cfg, device=device, log=log)
        try:
            return _run_with_data(cfg, data, device, resume_path, stop_after_steps, log, dims)
        finally:
            # Stop the shuffler's threads on every way out: a daemon thread still inside torch at
            # interpreter exit aborts the process ("terminate called without an active exception").
            data.close()


def _run_with_data(cfg, data, device, resume_path, stop_after_steps, log, checked) -> RunResult:
    out_dir = Path(cfg.out_dir)
    d_in, d_out = data.d_in, data.d_out or data.d_in
    if checked != (d_in, d_out):  # not estimated before loading, or other widths
        check_memory(cfg, d_in, d_out, device, log)

    trainer = Trainer(
        cfg,
        d_in=d_in,
        d_out=d_out,
        hook_name=cfg.hook,
        hook_name_out=cfg.hook_out,
        model_name=data.model_name,
    )
    trainer.scaled_sae.cfg.metadata["fastsae_data"] = data.record()
    log(f"precision: {trainer.precision.autocast} ({trainer.precision.reason})")
    if resume_path is not None:
        data_state = load_checkpoint(trainer, resume_path)
        data.load_state_dict(data_state)
        log(f"resumed from {resume_path} at step {trainer.step_count}")

    def last_good():
        return latest_good_checkpoint(out_dir)

    def checkpoint() -> Path:
        with write_errors(f"a checkpoint of step {trainer.step_count}", last_good):
            return save_checkpoint(trainer, out_dir, data_state=data.state_dict())

    remove_stale_run_temporaries(out_dir)  # what killed writes left (never a live writer's)
    metrics_path = out_dir / "metrics.jsonl"
    with write_errors(f"{out_dir}/config.json and metrics.jsonl", last_good):
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        # Resume replays the steps after the checkpoint; a fresh start drops a killed run's lines.
        truncate_metrics(metrics_path, trainer.step_count)
    wandb_run = _maybe_wandb(cfg, log)
    status = "done"
    next_checkpoint = _next_multiple(trainer.tokens, cfg.checkpoint_every_tokens)
    bar = _progress(cfg, trainer)
    first_step = trainer.step_count
    try:
        with _stop_on_signals() as stop, open(metrics_path, "a") as metrics_file:
            while trainer.step_count < cfg.total_steps:
                x, y = data.next_batch()
                try:
                    m = trainer.step(x, y)
                except NonFiniteLossError as e:
                    e.args = (f"{e}; last good checkpoint: {last_good() or 'none written yet'}",)
                    raise
                if trainer.step_count % cfg.log_every == 0 or trainer.step_count == cfg.total_steps:
                    with write_errors(str(metrics_path), last_good):
                        metrics_file.write(json.dumps(m) + "\n")
                        metrics_file.flush()
                    if wandb_run is not None:
                        wandb_run.log(m, step=trainer.step_count)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {
                            "tok/s": f"{m.get('tokens_per_s', 0):.0f}",
                            "loss": f"{m['loss']:.3g}",
                            "L0": f"{m['l0']:.1f}",
                            "FVU": f"{m['fvu']:.3f}",
                            "dead%": f"{m['dead_pct']:.1f}",
                        },
                        refresh=False,
                    )
                if cfg.eval_every and trainer.step_count % cfg.eval_every == 0:
                    ev = _evaluate(trainer, data)
                    with write_errors(str(metrics_path), last_good):
                        metrics_file.write(
                            json.dumps({"step": trainer.step_count, "eval": ev}) + "\n"
                        )
                if next_checkpoint and trainer.tokens >= next_checkpoint:
                    checkpoint()
                    next_checkpoint = _next_multiple(trainer.tokens, cfg.checkpoint_every_tokens)
                if stop["signal"] is not None or (
                    stop_after_steps is not None
                    and trainer.step_count - first_step >= stop_after_steps
                ):
                    status = "interrupted"
                    break
        path = checkpoint()
        if status == "interrupted":
            reason = (
                f"signal {signal.Signals(stop['signal']).name}"
                if stop["signal"] is not None
                else f"--stop-after-steps {stop_after_steps}"
            )
            log(f"\nstopped by {reason} at step {trainer.step_count}; checkpoint: {path}")
            log(f"resume with: python -m fastsae.train --resume {out_dir}")
            return RunResult(status=status, out_dir=str(out_dir), checkpoint=str(path))
    finally:
        if bar is not None:
            bar.close()

    with write_errors(f"the SAE to {out_dir / 'sae'}", last_good):
        sae_dir = trainer.save_sae(out_dir / "sae")
    final = _evaluate(trainer, data)
    with write_errors(f"final metrics and plots in {out_dir}", last_good):
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        _plots(out_dir, trainer)
    if wandb_run is not None:
        wandb_run.log({f"final/{k}": v for k, v in final.items()})
        wandb_run.finish()
    return RunResult(status=status, out_dir=str(out_dir), sae_dir=str(sae_dir), **final)


def _next_multiple(tokens: int, every: int) -> int:
    return (tokens // every + 1) * every if every else 0


def _progress(cfg: TrainConfig, trainer: Trainer):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.total_steps,
        initial=trainer.step_count,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def _maybe_wandb(cfg: TrainConfig, log):
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        log("wandb=True but the wandb package is not installed; logging to metrics.jsonl only")
        return None
    return wandb.init(project="fastsae", config=cfg.to_dict(), dir=str(cfg.out_dir))


def _evaluate(trainer: Trainer, data) -> dict[str, Any]:
    from fastsae.evaluate import EvalTarget

    cfg = trainer.cfg
    target = EvalTarget(trainer.inference_sae(), cfg.hook, cfg.hook_out, cfg.backend)
    with trainer.scratch():  # the step's slab memory, not a second copy of it
        return evaluate_targets([target], data)[0]


def evaluate_targets(targets, data) -> list[dict[str, Any]]:
    """:func:`fastsae.evaluate.evaluate_many` of ``targets`` on ``data``'s held-out split (CE/KL
    scores where the model is a TransformerLens one). ``eval_seconds``: the wall time of this
    evaluation, shared by all targets."""
    from fastsae.evaluate import evaluate_many

    start = time.perf_counter()
    # The shuffler's fill thread runs the same model: it waits while the evaluation holds it.
    with data.using_model():
        scored = data.model is not None and data.is_transformer_lens
        results = evaluate_many(
            targets,
            data.eval_columns(),
            model=data.model if scored else None,
            tokens=data.eval_tokens() if scored else None,
        )
    seconds = time.perf_counter() - start
    for metrics in results:
        metrics["eval_seconds"] = seconds
    return results


def _plots(out_dir: Path, trainer: Trainer) -> None:
    """Loss curves and the feature-density histogram, as PNGs.

    Drawn with matplotlib's object API (no pyplot state, so it is safe beside other threads) and a
    fixed layout with plain tick labels: ``tight_layout`` and log-axis mathtext labels cost more
    than the rest of a short run's bookkeeping, and a sweep draws these for every member."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    rows = [
        json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line
    ]
    rows = [r for r in rows if "loss" in r]
    if rows:
        fig = Figure(figsize=(13, 3.6))
        axes = fig.subplots(1, 3)
        fig.subplots_adjust(left=0.06, right=0.99, bottom=0.15, top=0.9, wspace=0.25)
        steps = [r["step"] for r in rows]
        for ax, key, label in zip(axes, ("loss", "fvu", "l0"), ("loss", "FVU", "L0"), strict=True):
            ax.plot(steps, [r[key] for r in rows])
            ax.set_xlabel("step")
            ax.set_title(label)
            if key in ("loss", "fvu") and min(r[key] for r in rows) > 0:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(NullFormatter())
        fig.savefig(out_dir / "training_curves.png", dpi=90)
    density = trainer.feature_density()
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.15, top=0.9)
    ax.hist(torch.log10(density + 1e-10).numpy(), bins=60)
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("latents")
    ax.set_title(f"feature density ({int((density == 0).sum())} never fired)")
    fig.savefig(out_dir / "feature_density.png", dpi=90)
