"""Train a group of SAEs on one activation stream: one model pass (or one cache read) per batch
feeds every member, several hooks of one model included.

Layout of ``OUT`` (the group's ``--out-dir``)::

    group.json                    the members' configs and the data seed (what --resume reads)
    summary.md / .csv / .json     one row per member: status, L0, FVU, CE/KL scores, ...
    pareto.png                    L0 against FVU and against the CE-loss / KL score
    members/<name>/               a single run's directory: sae/, metrics.jsonl, plots,
                                  checkpoints/, final_metrics.json, plus status.json

What is shared, and why each member still ends bit-identical to a solo run of its config on the
same batches (``tests/train/test_group.py`` checks every parameter with ``torch.equal``):

- the batches: one :class:`~fastsae.train.data.TrainData` over the union of the members' hooks;
  the data order follows the group's seed (``data_seed``, the base config's ``seed``), a member's
  own ``seed`` drives only its initialisation (``Trainer`` seeds a private generator with it);
- the geometric-median (or mean) ``b_dec`` target of the first batch, once per (hook, scale), and
  the scaled input of each step, once per (hook, scale, dtype): both are pure functions of the
  batch, so sharing them changes no bit;
- the evaluations: members due at the same step are evaluated together
  (:func:`fastsae.evaluate.evaluate_many`): one read (or model pass) of the held-out activations,
  one clean and one zero-ablated model pass per hook for the CE/KL scores, then one spliced pass per
  member. The numbers are each member's own (same sums, same order as alone);
- nothing else by default: each member keeps its own ``Trainer`` (parameters, Adam state,
  counters) and runs its own kernels. ``group_gemm=True`` (opt-in, not bitwise) stacks the
  encoders of the TopK/BatchTopK members of one scaled input into one GEMM per step
  (:func:`fastsae.ops.shared_encoder_gemm`): ``x @ W - b_dec @ W`` rounds differently from
  ``(x - b_dec) @ W``, and the BLAS blocking depends on the total width, so a near-tie in the
  top-k can flip.

A member whose step raises (a NaN loss, out of memory) is marked ``failed`` in its
``status.json``, reported, and dropped; the others go on. A member that reaches its own
``total_tokens`` writes its SAE and final evaluation at once and leaves the loop.

Checkpoints, SIGINT/SIGTERM and ``stop_after_steps`` work as for a single run: every running
member writes its checkpoint (with the shared data position) at the same step; ``--resume OUT``
picks the newest step that every running member holds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fastsae import ops
from fastsae.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fastsae.train.config import TrainConfig
from fastsae.train.memory import PLAN_SHARE, available_bytes, estimate, estimate_group
from fastsae.train.sweep import Member
from fastsae.train.trainer import NonFiniteLossError, Trainer, resolve_device

__all__ = ["GROUP_FILE", "is_group_dir", "load_group", "run_group"]

GROUP_FILE = "group.json"
FORMAT = 1
GiB = 2**30


def is_group_dir(path: str | Path) -> bool:
    return (Path(path) / GROUP_FILE).is_file()


def load_group(out_dir: str | Path) -> list[Member]:
    """The members recorded in ``OUT/group.json`` (each with ``out_dir`` = ``OUT``)."""
    meta = json.loads((Path(out_dir) / GROUP_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{out_dir}/{GROUP_FILE}: format {meta.get('format')!r}, expected 1")
    return [Member(m["name"], TrainConfig.from_dict(m["config"])) for m in meta["members"]]


class _Slot:
    """One member inside the loop: its trainer, files and status."""

    def __init__(self, member: Member, out_dir: Path):
        self.name = member.name
        self.dir = out_dir / "members" / member.name
        self.cfg = dataclasses.replace(member.cfg, out_dir=str(self.dir))
        self.trainer: Trainer | None = None
        #: the width of its hook's activations, once the data is open (the default lr needs it)
        self.d_in: int | None = None
        self.status = "running"
        self.error: str | None = None
        self.final: dict[str, Any] = {}
        self.metrics_file = None

    def write_status(self) -> None:
        step = self.trainer.step_count if self.trainer is not None else None
        record = {"status": self.status, "error": self.error, "step": step}
        if self.status == "done" or step is None:
            old = self._read_status()
            record["step"] = step if step is not None else old.get("step")
        (self.dir / "status.json").write_text(json.dumps(record, indent=1))

    def _read_status(self) -> dict[str, Any]:
        path = self.dir / "status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None


def run_group(
    members: list[Member],
    *,
    resume: bool = False,
    stop_after_steps: int | None = None,
    data_seed: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Train ``members`` (from :func:`fastsae.train.sweep.expand`) on one stream; see the module
    docstring. Returns ``{"status", "out_dir", "members": [summary rows]}``; status is ``done``
    (every member done or failed) or ``interrupted``. ``data_seed``: the seed of the data order
    (default: the first member's seed; ``--resume`` reads it from ``group.json``)."""
    from fastsae.train.data import open_data

    base = members[0].cfg
    out_dir = Path(base.out_dir or time.strftime("runs/%Y%m%d-%H%M%S-sweep"))
    if resume and data_seed is None:
        data_seed = json.loads((out_dir / GROUP_FILE).read_text())["data_seed"]
    if not resume and (is_group_dir(out_dir) or list_checkpoints(out_dir)):
        raise ValueError(
            f"out_dir={str(out_dir)!r} already holds a run; continue it with --resume "
            f"{out_dir}, or choose another --out-dir"
        )
    slots = [_Slot(m, out_dir) for m in members]
    device = resolve_device(base.device)
    hooks = []
    for s in slots:
        hooks += [h for h in (s.cfg.hook, s.cfg.hook_out) if h and h not in hooks]
    seed = base.seed if data_seed is None else data_seed
    data_cfg = dataclasses.replace(base, hook=hooks[0], hook_out=None, seed=seed)
    data = open_data(data_cfg, device=device, log=log, extra_hooks=hooks)
    _share_model_safely(data)
    try:
        return _run(slots, data, device, out_dir, resume, stop_after_steps, log)
    finally:
        data.close()
        for s in slots:
            s.close()


def _build(slots: list[_Slot], data, device, log) -> None:
    """Trainers for every member, after the group memory estimate."""
    estimates = []
    for s in slots:
        d_in = s.d_in = data.dims[s.cfg.hook]
        d_out = data.dims[s.cfg.hook_out] if s.cfg.hook_out else d_in
        estimates.append(
            estimate(s.cfg, d_in, d_out, optimizer_in_backward=bool(s.cfg.optimizer_in_backward))
        )
    host = data.cfg.buffer_tokens * sum(data.dims[h] for h in data.hooks) * 4
    mem = estimate_group(estimates, host)
    log(f"group memory estimate ({len(slots)} SAEs): {mem.describe()}")
    free = available_bytes(device)
    # Weight averages first: drop them all (as one process would) when the group does not fit.
    drop_averages = mem.average > 0 and mem.device_total > PLAN_SHARE * free
    if drop_averages:
        log(
            f"the members' weight averages ({mem.average / GiB:.1f} GiB) do not fit: the group "
            "trains without them and serves the raw weights"
        )
        mem.average = 0
    if mem.device_total > free:
        worst = max(range(len(slots)), key=lambda i: estimates[i].device_total)
        raise MemoryError(
            f"this group needs about {mem.device_total / GiB:.1f} GiB on {device} but "
            f"{free / GiB:.1f} GiB is free ({mem.describe()}); the largest member is "
            f"{slots[worst].name} ({estimates[worst].device_total / GiB:.1f} GiB): drop members, "
            "or split the sweep into several groups"
        )
    pool = None
    for s in slots:
        if s.status != "running":
            continue
        d_out = data.dims[s.cfg.hook_out] if s.cfg.hook_out else None
        s.trainer = Trainer(
            s.cfg,
            d_in=data.dims[s.cfg.hook],
            d_out=d_out,
            hook_name=s.cfg.hook,
            hook_name_out=s.cfg.hook_out,
            model_name=data.model_name,
        )
        if drop_averages:
            s.trainer.average_gamma = None
        # Members step one after another on this thread: one slab buffer serves them all.
        if s.trainer.scratch_pool is not None:
            pool = pool or s.trainer.scratch_pool
            s.trainer.scratch_pool = pool


def _write_group_file(slots: list[_Slot], out_dir: Path, data_seed: int) -> None:
    meta = {
        "format": FORMAT,
        "data_seed": data_seed,
        "members": [
            {"name": s.name, "config": dataclasses.replace(s.cfg, out_dir=str(out_dir)).to_dict()}
            for s in slots
        ],
    }
    (out_dir / GROUP_FILE).write_text(json.dumps(meta, indent=1))


def _resume(slots: list[_Slot], data, log) -> None:
    """Restore every running member at the newest step that all of them hold."""
    running = [s for s in slots if s.status == "running"]
    if not running:
        return
    steps = None
    for s in running:
        have = {int(p.name.split("-")[1]) for p in list_checkpoints(s.dir)}
        steps = have if steps is None else steps & have
    if not steps:
        raise ValueError(
            "--resume: the running members hold no checkpoint at a common step ("
            + ", ".join(f"{s.name}: {len(list_checkpoints(s.dir))}" for s in running)
            + " checkpoints)"
        )
    step = max(steps)
    data_state = None
    for s in running:
        data_state = load_checkpoint(s.trainer, s.dir / "checkpoints" / f"step-{step:08d}")
    data.load_state_dict(data_state)
    log(f"resumed {len(running)} running members at step {step}")


def _run(slots, data, device, out_dir: Path, resume, stop_after_steps, log) -> dict[str, Any]:
    from fastsae.train.run import _next_multiple, _stop_on_signals

    base = slots[0].cfg
    if resume:
        for s in slots:
            s.status = s._read_status().get("status", "running")
            if s.status == "interrupted":
                s.status = "running"
            if s.status != "running":
                prev = s.dir / "final_metrics.json"
                s.final = json.loads(prev.read_text()) if prev.exists() else {}
                s.error = s._read_status().get("error")
    _build(slots, data, device, log)
    if resume:
        _resume(slots, data, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_group_file(slots, out_dir, data.cfg.seed)
    for s in slots:
        s.dir.mkdir(parents=True, exist_ok=True)
        if s.status == "running":
            (s.dir / "config.json").write_text(json.dumps(s.cfg.to_dict(), indent=2))
            s.metrics_file = open(s.dir / "metrics.jsonl", "a")  # noqa: SIM115
            s.write_status()

    running = [s for s in slots if s.status == "running"]
    first = running[0].trainer.step_count if running else 0
    step = first
    tokens = step * base.batch_size
    next_checkpoint = _next_multiple(tokens, base.checkpoint_every_tokens)
    bar = _progress(base, slots, first)
    status = "done"
    try:
        with _stop_on_signals() as stop:
            while running:
                batch = data.next_columns()
                _step_all(running, batch, log)
                step += 1
                tokens += base.batch_size
                due = [
                    s
                    for s in running
                    if s.status == "running" and s.cfg.eval_every and step % s.cfg.eval_every == 0
                ]
                for s, ev in _evaluate_all(due, data, log):
                    s.metrics_file.write(json.dumps({"step": step, "eval": ev}) + "\n")
                _finish_all(
                    [
                        s
                        for s in running
                        if s.status == "running" and s.trainer.step_count >= s.cfg.total_steps
                    ],
                    data,
                    log,
                )
                running = [s for s in running if s.status == "running"]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"running": len(running)}, refresh=False)
                if next_checkpoint and tokens >= next_checkpoint and running:
                    for s in running:
                        save_checkpoint(s.trainer, s.dir, data_state=data.state_dict())
                    next_checkpoint = _next_multiple(tokens, base.checkpoint_every_tokens)
                if running and (
                    stop["signal"] is not None
                    or (stop_after_steps is not None and step - first >= stop_after_steps)
                ):
                    status = "interrupted"
                    for s in running:
                        save_checkpoint(s.trainer, s.dir, data_state=data.state_dict())
                        s.write_status()
                    log(f"\nstopped at step {step} ({len(running)} members running)")
                    log(f"resume with: python -m fastsae.train --resume {out_dir}")
                    break
    finally:
        if bar is not None:
            bar.close()
    rows = [_summary_row(s) for s in slots]
    if status == "done":
        from fastsae.train.pareto import write_summary

        write_summary(out_dir, rows)
    return {"status": status, "out_dir": str(out_dir), "members": rows}


def _step_all(running: list[_Slot], batch: dict[str, torch.Tensor], log) -> None:
    """One step of every running member on ``batch``; the scaled inputs are computed once per
    (hook, scale, dtype) and shared. With ``group_gemm``, the eligible members of one scaled
    input (:func:`_gemm_eligible`) get their pre-activations from one stacked GEMM."""
    scaled: dict[tuple, tuple] = {}
    keys: dict[str, tuple] = {}
    init_memo: dict[tuple, dict] = {}  # (hook, hook_out) -> the b_dec targets of the first batch
    for s in running:
        t = s.trainer
        if t.step_count >= s.cfg.total_steps:
            continue
        x = batch[s.cfg.hook]
        y = batch[s.cfg.hook_out] if s.cfg.hook_out else None
        if not t.initialized:
            # Each member initialises itself: the data-dependent init (scales, b_dec, the
            # encoder's least-squares scale, JumpReLU thresholds) depends on its own weights.
            memo = init_memo.setdefault((s.cfg.hook, s.cfg.hook_out), {})
            t.initialize(x, y, memo=memo)
        key = (
            s.cfg.hook,
            s.cfg.hook_out,
            float(t.in_scale),
            float(t.out_scale),
            t.scaled_sae.dtype,
        )
        if key not in scaled:
            scaled[key] = t.normalize(x, y)
        keys[s.name] = key
    gemms = {}
    if running and running[0].cfg.group_gemm:
        for key in scaled:
            members = [s for s in running if keys.get(s.name) == key and _gemm_eligible(s)]
            if len(members) > 1:
                gemms[key] = [s.trainer.scaled_sae for s in members]
    with contextlib.ExitStack() as stack:
        for key, saes in gemms.items():
            encoders = [(sae.W_enc, sae.b_enc, sae._encoder_input(scaled[key][0])) for sae in saes]
            stack.enter_context(ops.shared_encoder_gemm(scaled[key][0], encoders))
        for s in running:
            if s.name not in keys or s.status != "running":
                continue
            t, key = s.trainer, keys[s.name]
            metrics = _guard(s, lambda t=t, key=key: t.step_normalized(*scaled[key]), log)
            if metrics is None:
                continue
            if t.step_count % s.cfg.log_every == 0 or t.step_count == s.cfg.total_steps:
                s.metrics_file.write(json.dumps(metrics) + "\n")
                s.metrics_file.flush()


def _gemm_eligible(s: _Slot) -> bool:
    """A member whose selection the stacked GEMM can serve: TopK or BatchTopK on the torch
    backend, fp32/fp64 without autocast (as resolved: "auto" may pick bf16), no skip connection, an SAE (not a transcoder)."""
    cfg, sae = s.cfg, s.trainer.scaled_sae
    if cfg.architecture not in ("topk", "batchtopk") or s.trainer.precision.autocast != "none":
        return False
    if sae.W_skip is not None or cfg.hook_out:
        return False
    with ops.use_backend(cfg.backend):
        return ops.get_backend() == "torch"


def _guard(s: _Slot, fn, log):
    """Run ``fn``; if it raises, mark ``s`` failed, free its trainer and report."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # one member's failure must not stop the others
        step = s.trainer.step_count if s.trainer is not None else None
        s.status = "failed"
        s.error = f"{type(e).__name__}: {e}"
        if isinstance(e, NonFiniteLossError):
            kept = list_checkpoints(s.dir)
            s.error += f"; last good checkpoint: {kept[-1] if kept else 'none written yet'}"
        log(f"member {s.name} failed at step {step}: {s.error}; the others continue")
        s.write_status()
        s.trainer = None
        s.close()
        return None


class _LockedSource:
    """An activation source whose model calls hold ``lock``: the shuffler's fill thread runs the
    model while a member is evaluated, which also runs it (and splices hooks into it); one model
    must serve one caller at a time, or hooks mix across threads."""

    def __init__(self, source, lock: threading.RLock):
        self._source = source
        self._lock = lock

    def __getattr__(self, name: str):
        return getattr(self._source, name)

    def activations(self, *args, **kwargs):
        with self._lock:
            return self._source.activations(*args, **kwargs)

    def stream(self, batches, **kwargs):
        chunks = self._source.stream(batches, **kwargs)
        while True:
            with self._lock:
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk


def _share_model_safely(data) -> None:
    """Give ``data`` a ``model_lock`` held by every model call, unless it has one already."""
    if getattr(data, "model_lock", None) is not None:
        return
    data.model_lock = threading.RLock()
    if getattr(data, "source", None) is not None:
        data.source = _LockedSource(data.source, data.model_lock)


def _member_data(s: _Slot, data):
    """``data`` seen through the member's hooks (what ``run._evaluate`` reads)."""
    view = copy.copy(data)
    view.cfg = dataclasses.replace(data.cfg, hook=s.cfg.hook, hook_out=s.cfg.hook_out)
    return view


def _evaluate(s: _Slot, data) -> dict[str, Any]:
    from fastsae import ops
    from fastsae.train.run import _evaluate as evaluate

    # the member's backend, as in training (an ``auto`` evaluation under TRITON_INTERPRET=1
    # would run the Triton kernels interpreted: minutes)
    lock = data.model_lock if data.model is not None else contextlib.nullcontext()
    with lock, ops.use_backend(s.cfg.backend):
        return evaluate(s.trainer, _member_data(s, data))


def _evaluate_all(slots: list[_Slot], data, log) -> list[tuple[_Slot, dict[str, Any]]]:
    """Evaluate ``slots`` together (:func:`fastsae.evaluate.evaluate_many`: one read of the
    held-out activations, one clean and one zero-ablated model pass per hook, one spliced pass per
    member), each with the numbers it would get alone. If that raises, each member is evaluated
    on its own, so that one member's failure marks only that member failed."""
    if not slots:
        return []
    from fastsae.evaluate import EvalTarget
    from fastsae.train.run import evaluate_targets

    try:
        targets = [
            EvalTarget(s.trainer.inference_sae(), s.cfg.hook, s.cfg.hook_out, s.cfg.backend)
            for s in slots
        ]
        with slots[0].trainer.scratch():  # the members' shared slab buffer
            return list(zip(slots, evaluate_targets(targets, data), strict=True))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        log(
            f"shared evaluation failed ({type(exc).__name__}: {exc}); "
            "evaluating the members one by one"
        )
    done = []
    for s in slots:
        ev = _guard(s, lambda s=s: _evaluate(s, data), log)
        if ev is not None:
            done.append((s, ev))
    return done


def _finish_all(slots: list[_Slot], data, log) -> None:
    """What a single run does at its end, for every member of ``slots`` (those reaching their
    ``total_tokens`` at this step): checkpoint, SAE, final evaluation (together), plots."""
    for s in slots:
        _guard(s, lambda s=s: _save_final(s, data), log)
    for s, final in _evaluate_all([s for s in slots if s.status == "running"], data, log):
        _guard(s, lambda s=s, final=final: _write_final(s, final), log)


def _save_final(s: _Slot, data) -> None:
    save_checkpoint(s.trainer, s.dir, data_state=data.state_dict())
    s.trainer.save_sae(s.dir / "sae")


def _write_final(s: _Slot, final: dict[str, Any]) -> None:
    from fastsae.train.run import _plots

    s.final = final
    (s.dir / "final_metrics.json").write_text(json.dumps(s.final, indent=2))
    s.close()
    _plots(s.dir, s.trainer)
    s.status = "done"
    s.write_status()
    s.trainer = None


def _progress(base: TrainConfig, slots: list[_Slot], first: int):
    if not base.progress:
        return None
    import sys

    from tqdm.auto import tqdm

    total = max(s.cfg.total_steps for s in slots)
    return tqdm(total=total, initial=first, unit="step", dynamic_ncols=True, file=sys.stderr)


def _summary_row(s: _Slot) -> dict[str, Any]:
    cfg = s.cfg
    row: dict[str, Any] = {
        "name": s.name,
        "status": s.status,
        "architecture": cfg.architecture,
        "hook": cfg.hook,
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "lr": cfg.lr if s.d_in is None else cfg.lr_for(s.d_in),
        "seed": cfg.seed,
        "steps": s._read_status().get("step"),
    }
    for key in ("l0", "fvu", "explained_variance", "dead_pct", "ce_loss_score", "kl_score"):
        row[key] = s.final.get(key)
    row["error"] = s.error
    row["dir"] = str(s.dir)
    return row
