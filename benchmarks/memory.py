"""Peak memory per worker of ZeRO 0/1/2/3 x LoRA/full fine-tuning on the Dreamshaper-v7 UNet architecture.

    python benchmarks/memory.py                                  # width 0.5, latent 8, 4-step trajectory
    python benchmarks/memory.py --width 1.0 --modes lora         # the full-size UNet (LoRA: ~4 GiB per worker)
    python benchmarks/memory.py --width 0.1 --latent 8 --stages 3 --modes full --no-write   # the test

The UNet is built from ``benchmarks/configs/dreamshaper_v7_unet.json`` (the UNet2DConditionModel config
of SimianLuo/LCM_Dreamshaper_v7: SD1.5 + the LCM guidance embedding, 859.6M parameters) with random
weights; ``--width`` scales its channel widths (1.0 = the real model; channels stay multiples of the 32
norm groups). Each configuration runs in 2 fresh processes (a gloo group, one torch thread each) that
do what a rocm_ray Ray worker does: ``make_policy`` (LoRA rank 8 on to_q/to_k/to_v/to_out.0, or full
fine-tuning with the frozen reference copy), the DeepSpeed engine of ``rocm_ray.train.ds_engine``
(buckets from the trainable parameter count, ZeRO-3 partitioning the reference too), then two training
steps, each a trajectory of ``--calls`` UNet calls on one latent of ``--latent`` x ``--latent`` as ROCM
samples it: the policy's and the reference's noise predictions at every x_n, the divergence and a
reward-like term backpropagated through the whole chain, ``engine.backward`` and ``engine.step``.
Reported per worker: the peak resident set size (getrusage), and that peak minus the resident size
after imports, the process group and a 6-parameter engine of the same stage (what the model, its
gradients, optimizer state, buffers and activations added). Ratios are to ZeRO 0 of the same mode.
``--trace`` prints each phase's resident and peak size (build, engine, reference, forward, backward, step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "benchmarks" / "configs" / "dreamshaper_v7_unet.json"
START, END = "<!-- memory:start -->", "<!-- memory:end -->"
# glibc returns every freed block above 64 KiB to the system at once (no dynamic mmap threshold, no
# heap high-water mark): the resident size then follows the live tensors, as a GPU allocator's peak
# would, instead of what the heap kept from start-up. The same for every configuration.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _rss_mib(field: str = "VmRSS") -> float:
    """The process's resident size (VmRSS) or its peak so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def unet_config(width: float) -> dict:
    """The Dreamshaper-v7 UNet config with channel widths scaled by ``width`` (multiples of 32)."""
    cfg = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")}
    cfg["block_out_channels"] = [max(32, int(round(c * width / 32)) * 32) for c in cfg["block_out_channels"]]
    return cfg


def worker(args) -> None:
    """One rank: build, two steps, write {"peak_mib", "start_mib", "trainable"} to ``args.out``."""
    import types

    import torch
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel

    from rocm_ray.models.policy import make_policy
    from rocm_ray.train.ds_engine import (
        build_engine,
        deepspeed_config,
        partition_reference,
        release_reference,
        zero_config,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    # code, not tensors: the modules DeepSpeed loads on a stage's first use (ZeRO 1/2 pull in torch._inductor
    # and networkx, ~50 MB of host memory that a GPU's memory would not see) are loaded before the baseline
    # by a 6-parameter engine of the same stage, in every configuration
    build_engine(torch.nn.Linear(2, 2), 1e-5, (0.9, 0.999), 0.0, deepspeed_config(1, args.stage, 1.0))

    start = _rss_mib()
    phases: list[tuple[str, float, float]] = []  # (after what, resident MiB, peak so far MiB)

    def mark(name: str) -> None:
        phases.append((name, _rss_mib(), _rss_mib("VmHWM")))

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(args.width))
    pipe = types.SimpleNamespace(unet=unet, vae=torch.nn.Identity(), text_encoder=torch.nn.Identity(),
                                 tokenizer=None, scheduler=None)
    policy = make_policy(pipe, lora_rank=8 if args.mode == "lora" else 0, lora_alpha=8.0)
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    mark("policy")
    cfg = deepspeed_config(1, args.stage, 1.0, {"zero_optimization": zero_config(args.stage, trainable)})
    engine = build_engine(policy.unet, 1e-5, (0.9, 0.999), 0.0, cfg)
    mark("engine")
    ref_engine = partition_reference(policy, cfg)
    mark("reference")
    g = torch.Generator().manual_seed(dist.get_rank())
    side, dim = args.latent, unet.config.cross_attention_dim
    for _ in range(2):
        # a trajectory of --calls steps, as ROCM samples one: policy and reference at every x_n, the
        # divergence and the reward backpropagated through all of them (x_T itself needs no gradient)
        x = torch.randn(1, 4, side, side, generator=g)  # [1, 4, h, w]
        text = torch.randn(1, 77, dim, generator=g)  # [1, 77, E]
        w = torch.randn(1, unet.config.time_cond_proj_dim, generator=g)  # [1, 256]
        div = x.new_zeros(())
        for n in range(args.calls):
            t = 999 - n * (1000 // args.calls)
            eps = policy.eps_fn(engine)(x, t, w, text)  # [1, 4, h, w]
            ref = policy.ref_eps_fn()(x, t, w, text)  # [1, 4, h, w]
            div = div + (eps - ref).pow(2).mean()
            x = x - 0.1 * eps
        k = len([p for p in phases if p[0].startswith("step")]) + 1
        mark(f"forward {k}")
        engine.backward(div + x.mean())
        release_reference(ref_engine)
        mark(f"backward {k}")
        engine.step()
        mark(f"step {k}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    Path(args.out).write_text(json.dumps({"peak_mib": peak, "start_mib": start, "trainable": trainable,
                                          "phases": phases}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(mode: str, stage: int, args, tmp: Path) -> dict:
    """Two worker processes of one configuration; the larger of their peaks."""
    port, procs, outs = _free_port(), [], []
    for rank in range(2):
        out = tmp / f"{mode}_{stage}_{rank}.json"
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **MALLOC_ENV,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--stage", str(stage), "--width",
               str(args.width), "--latent", str(args.latent), "--calls", str(args.calls), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    for p in procs:
        try:
            _, err = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"{mode} ZeRO {stage}: a worker ran past {args.timeout} s") from None
        if p.returncode:
            raise RuntimeError(f"{mode} ZeRO {stage}: a worker failed:\n{err[-3000:]}")
    res = [json.loads(o.read_text()) for o in outs]
    return {"mode": mode, "stage": stage, "trainable": res[0]["trainable"],
            "peak": max(r["peak_mib"] for r in res), "added": max(r["peak_mib"] - r["start_mib"] for r in res),
            "phases": res[0]["phases"], "start": res[0]["start_mib"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=float, default=0.5, help="channel width scale (1.0 = the real UNet)")
    ap.add_argument("--latent", type=int, default=8, help="latent side (64 = 512 px images)")
    ap.add_argument("--calls", type=int, default=4, help="sampling steps per trajectory (UNet calls per step)")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    ap.add_argument("--trace", action="store_true", help="print every phase's resident/peak size")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        worker(args)
        return 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import machine, versions, write_section

    stages = [int(s) for s in args.stages.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rocm_ray_mem_") as tmp:
        for mode in args.modes.split(","):  # stages of a mode back to back: their ratio is what counts
            for stage in stages:
                rows.append(run_config(mode, stage, args, Path(tmp)))
                r = rows[-1]
                trace = ", ".join(f"{n} {rss - r['start']:.0f}/{hwm - r['start']:.0f}" for n, rss, hwm in r["phases"])
                print(f"{mode} ZeRO {stage}: peak {r['peak']:.0f} MiB" + (
                    f" (rank 0 after each phase, MiB above start, resident/peak: {trace})" if args.trace else ""),
                    flush=True)
    base = {r["mode"]: r["added"] for r in rows if r["stage"] == stages[0]}
    lines = [f"| mode | ZeRO stage | trainable parameters | peak RSS per worker (MiB) | added by the model and "
             f"training (MiB) | ratio to ZeRO {stages[0]} |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['stage']} | {r['trainable']:,} | {r['peak']:.0f} | {r['added']:.0f} | "
                     f"{r['added'] / base[r['mode']]:.2f}x |")
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        n = sum(p.numel() for p in UNet2DConditionModel(**unet_config(args.width)).parameters())
    cfg = unet_config(args.width)
    text = "\n".join([
        f"UNet: the Dreamshaper-v7 architecture at width {args.width:g} (block_out_channels "
        f"{cfg['block_out_channels']}, {n / 1e6:.1f}M parameters; the real model is width 1, 859.6M), random "
        f"weights; latent {args.latent} x {args.latent}, batch 1 per worker, a trajectory of {args.calls} UNet "
        "calls (policy and reference) per step, 2 gloo workers on CPU, one torch thread each, fp32, torch AdamW; "
        "freed tensors returned to the system at once (glibc MALLOC_MMAP_THRESHOLD_=65536).",
        f"Machine: {machine()}; {versions()}.", "", *lines])
    print(text)
    if not args.no_write:
        cmd = "python benchmarks/memory.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
        write_section(START, END, "Memory per worker (`benchmarks/memory.py`)", cmd, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
