"""Multi-process training ends with the same weights as one process on the same data.

Each case spawns 2 or 4 gloo processes (fastsae/parallel/launch.py, bounded by a timeout), runs
a few steps on seeded synthetic batches, and compares the consolidated slabs, Adam's second
moments and the dead-latent counters with a one-process :class:`Trainer` on the same global
batches.

Tolerance: ``rtol = atol = 1e-5`` on fp32 weights after the steps. The only differences are the
order of fp32 sums: the data-parallel gradient is the mean of per-rank means instead of one mean
(~1e-7 relative), the latent-sharded reconstruction is a sum of per-slab partial decodes, and each
slab's encoder GEMM is a different column block. Adam divides by sqrt(v), so a relative gradient
error becomes a relative update error of the same size; lr * steps bounds the weights' change, so
the weights differ by ~lr * 1e-6, far below 1e-5. AuxK is on from the second step
(``dead_tokens`` is one batch) so its exchange is covered.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fastsae.parallel.cost import step_bytes
from fastsae.parallel.launch import spawn, train_single, train_synthetic

STEPS = 4
RTOL = ATOL = 1e-5


def _cfg(**over) -> dict:
    cfg = dict(
        architecture="topk",
        d_in=16,
        d_sae=64,
        k=5,
        batch_size=32,
        buffer_tokens=64,
        backend="torch",
        device="cpu",
        warmup_steps=0,
        lr=3e-3,
        dead_tokens=32,
        k_aux=7,
        progress=False,
    )
    cfg.update(over)
    return cfg


def _consolidate(tmp_path, world: int, d_sae: int) -> dict[str, torch.Tensor]:
    """Full tensors from the per-rank slabs (data rank 0's slabs; the others are replicas)."""
    slabs = []
    for r in range(world):
        flat = load_file(str(tmp_path / f"slab-{r}.safetensors"))
        slab = {"offset": int(flat["offset"][0]), "sae": {}, "exp_avg_sq": {}}
        for key, t in flat.items():
            group, _, name = key.partition("/")
            if name:
                slab[group][name] = t
            elif key != "offset":
                slab[key] = t
        slabs.append(slab)
    by_offset = {}
    for s in slabs:
        by_offset.setdefault(s["offset"], s)
    parts = [by_offset[o] for o in sorted(by_offset)]
    full = {}
    for name in parts[0]["sae"]:
        ts = [p["sae"][name] for p in parts]
        if name == "W_enc":
            full[name] = torch.cat(ts, dim=1)
        elif name in ("b_enc", "W_dec"):
            full[name] = torch.cat(ts)
        else:
            full[name] = ts[0]
    full["since_fired"] = torch.cat([p["since_fired"] for p in parts])
    full["fire_counts"] = torch.cat([p["fire_counts"] for p in parts])
    full["v_W_dec"] = torch.cat([p["exp_avg_sq"]["W_dec"] for p in parts])
    for s in slabs:  # replicas along the data axis hold the same slab
        ref = by_offset[s["offset"]]
        for name, t in s["sae"].items():
            torch.testing.assert_close(t, ref["sae"][name], rtol=0, atol=0)
    return full


@pytest.mark.parametrize(
    ("mode", "world", "arch"),
    [
        ("dp", 2, "topk"),
        ("dp", 4, "topk"),
        ("latent", 2, "topk"),
        ("latent", 4, "topk"),
        ("latent", 2, "batchtopk"),
        ("dp,latent", 4, "topk"),
        ("latent", 2, "topk+optimizer_in_backward"),
        ("latent", 2, "topk+grad_clip"),
        ("dp", 2, "batchtopk"),
        ("dp,latent", 4, "batchtopk"),
        ("dp", 2, "jumprelu"),
        ("dp", 2, "gated"),
    ],
)
def test_same_weights_as_one_process(tmp_path, mode, world, arch):
    arch, _, option = arch.partition("+")
    # grad_clip=0.05: below the first steps' gradient norms, so the clipping scales every step.
    values = {"optimizer_in_backward": True, "grad_clip": 0.05}
    over = {option: values[option]} if option else {}
    if arch in ("jumprelu", "gated"):  # the L0 controllers, from the L0 of every rank's rows
        over.update(k=None, target_l0=5)
    cfg = _cfg(architecture=arch, **over)
    spawn(train_synthetic, world, mode, cfg, STEPS, str(tmp_path), timeout_s=180)
    got = _consolidate(tmp_path, world, cfg["d_sae"])
    one = train_single(cfg, STEPS)
    assert int((one.since_fired >= cfg["dead_tokens"]).sum()) > 0, "AuxK was never exercised"
    want = {k: v for k, v in one.scaled_sae.state_dict().items()}
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=RTOL, atol=ATOL, msg=name)
    torch.testing.assert_close(got["since_fired"], one.since_fired, rtol=0, atol=0)
    torch.testing.assert_close(got["fire_counts"], one.fire_counts, rtol=0, atol=0)
    v = one.optimizer_state(one.scaled_sae.W_dec)["exp_avg_sq"]
    torch.testing.assert_close(got["v_W_dec"], v, rtol=1e-4, atol=1e-12)
    if arch == "topk":
        _check_bytes(tmp_path, world, cfg)


def _check_bytes(tmp_path, world: int, cfg: dict) -> None:
    """Every rank handed exactly the bytes of fastsae/parallel/cost.py to collectives."""
    for r in range(world):
        stats = json.loads((tmp_path / f"stats-{r}.json").read_text())
        for step, (measured, n_dead) in enumerate(
            zip(stats["bytes"], stats["n_dead"], strict=True)
        ):
            want = step_bytes(
                batch=cfg["batch_size"],
                d_in=cfg["d_in"],
                d_out=cfg["d_in"],
                n=cfg["d_sae"],
                k=cfg["k"],
                dp=stats["dp"],
                latent=stats["latent"],
                aux_width=min(cfg["k_aux"], n_dead),
                first_step=step == 0,
                grad_clip=cfg.get("grad_clip") is not None,
            )
            assert measured == want.payload, (r, step, measured, want)
