"""Benchmark: per-step cost of SGD vs SGD + KFAC on the paper's networks.

    python -m lightning_kfac_swa.bench                      # both networks, CPU or CUDA
    python -m lightning_kfac_swa.bench --nets preresnet110 --methods inverse

Each configuration runs in its own subprocess (so peak memory is its own) through a real
``lightning.Trainer`` on synthetic CIFAR-shaped data (batch 128, 100 classes). Steps are
split by kind: *plain* (preconditioning only), *factor* (plus factor statistics) and the
*decomposition* (timed separately). The amortised figure assumes the paper's intervals:
factors every 10 steps, decompositions every 100:

    amortised = plain + (factor - plain) / 10 + decomposition / 100

and is divided by the SGD step time measured in the same process (``--rounds`` K-FAC runs,
each followed by an SGD run), so machine-speed drift between processes does not
enter the ratio.

Peak memory is the peak resident set size of the first K-FAC run (which runs before any SGD
run of its process) on CPU, ``max_memory_allocated`` on CUDA.

``--malloc-tuned`` runs every configuration (SGD included) with glibc told to keep freed
memory (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): on CPU part of every
backward's cost under glibc's defaults is page faults on fresh memory, and this shows the
figures without them. ``--thp`` does the same through PyTorch's own switch for transparent
huge pages (``THP_MEM_ALLOC_ENABLE=1``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

NETS = ("vgg16", "preresnet110")


def _run_one(net: str, method: str, batch_size: int, steps: int, locations: int, fisher: str,
             device: str, rounds: int = 2, breakdown: bool = False) -> dict:
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_kfac_swa.kfac import KFAC
    from lightning_kfac_swa.models import VGG16, PreResNet

    class Bench(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = VGG16(100) if net == "vgg16" else PreResNet(110, 100)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    class Timer(Callback):
        def __init__(self, on_step=None):
            self.times = []
            self.on_step = on_step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            if self.on_step is not None:
                self.on_step()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * steps, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (batch_size * steps,), generator=g)
    def fit(kfac=None, on_step=None) -> list[float]:
        timer = Timer(on_step)
        callbacks: list = [timer] if kfac is None else [kfac, timer]
        trainer = pl.Trainer(accelerator=device, devices=1, max_steps=steps, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)
        trainer.fit(Bench(), DataLoader(TensorDataset(x, y), batch_size=batch_size))
        return timer.times

    def make_kfac() -> KFAC:  # factor steps at 0, 3, 6, ...; decompositions only at step 0
        return KFAC(method=method, factor_update_interval=3, inverse_update_interval=10**9,
                    conv_locations=locations or None, fisher=fisher)

    if method == "sgd":
        kfac, factor, sgd = None, None, None
        plain = statistics.median(fit()[1:])  # step 0 includes warm-up
    else:
        # factor steps at 0, 3, 6, ...: step 0 also decomposes (timed apart below). SGD runs in
        # the same process, alternating with K-FAC (K-FAC, SGD, K-FAC, SGD, ...), so the ratio is
        # paired against drifts of the machine's speed (±30 % between processes on shared CPUs).
        # The first K-FAC run comes first, so its peak memory is not inflated by the SGD runs'.
        sgd_times: list[float] = []
        plains: list[float] = []
        factors: list[float] = []
        peak = 0.0
        for r in range(rounds):
            kfac = make_kfac()
            times = fit(kfac)
            if r == 0:
                peak = _peak_gb(device)
            plains += [times[i] for i in range(1, len(times)) if i % 3]
            factors += [times[i] for i in range(1, len(times)) if i % 3 == 0]
            sgd_times += fit()[1:]
        plain, factor, sgd = statistics.median(plains), statistics.median(factors), statistics.median(sgd_times)
    split = None
    if breakdown and kfac is not None:
        split = _factor_step_split(fit, make_kfac(), steps)
    decomposition = None
    if kfac is not None:
        t0 = time.perf_counter()
        kfac._decompose()  # noqa: SLF001 - the benchmark times the callback's own routine
        if device == "cuda":
            torch.cuda.synchronize()
        decomposition = time.perf_counter() - t0
    if kfac is None:
        peak = _peak_gb(device)
    return {"net": net, "method": method, "locations": locations, "fisher": fisher, "plain_s": plain, "factor_s": factor,
            "sgd_s": sgd, "decomposition_s": decomposition, "peak_gb": peak, "threads": torch.get_num_threads(),
            "split": split}


def _factor_step_split(fit, kfac, steps: int) -> dict:
    """CPU seconds in each of KFAC's ``kfac::*`` profiler ranges, per factor step (per step for
    ``precondition``), from one extra run under ``torch.profiler`` (step 0 left out)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=0, active=steps - 1)) as prof:
        fit(kfac, on_step=prof.step)
    n_factor = sum(1 for i in range(1, steps) if i % 3 == 0)
    out = {}
    for e in prof.key_averages():
        if e.key.startswith("kfac::"):
            name = e.key[len("kfac::"):]
            out[name] = e.cpu_time_total / 1e6 / (steps - 1 if name == "precondition" else n_factor)
    return out


def _peak_gb(device: str) -> float:
    """Peak memory of the process so far: max RSS on CPU, ``max_memory_allocated`` on CUDA."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def factor_accuracy(net: str, locations: int, batch_size: int = 128, seed: int = 0) -> dict:
    """Error of the ``conv_locations`` estimate against all locations, on real images.

    Two batches of scikit-learn's digits (32×32 RGB) through the freshly initialised network,
    empirical-Fisher statistics. For each conv layer: the relative Frobenius error of the
    estimated A and G against all locations of the same batch, next to the difference between
    the full statistics of two batches (the sampling noise K-FAC lives with anyway), and the
    cosine between the whole network's preconditioned gradients (inverse route, λ = 0.01).
    """
    import torch
    import torch.nn.functional as F

    from lightning_kfac_swa import kfac_math as km
    from lightning_kfac_swa.data import DigitsDataModule
    from lightning_kfac_swa.kfac_layers import make_helper
    from lightning_kfac_swa.models import VGG16, PreResNet

    torch.manual_seed(seed)
    model = VGG16(100) if net == "vgg16" else PreResNet(110, 100)
    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup("fit")
    helpers = {n: make_helper(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    stats = []
    batches = iter(dm.train_dataloader())
    for _ in range(2):
        x, y = next(batches)
        inputs, outputs = {}, {}

        def keep(name):
            def hook(module, inp, out):
                inputs[name], outputs[name] = inp[0].detach(), out
            return hook
        hooks = [h.module.register_forward_hook(keep(n)) for n, h in helpers.items()]
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        grads = dict(zip(outputs, torch.autograd.grad(loss, list(outputs.values()), retain_graph=True)))
        loss.backward()
        for h in hooks:
            h.remove()
        stats.append((inputs, grads, {n: h.grad_matrix(torch.float32) for n, h in helpers.items()}))
    gen = torch.Generator().manual_seed(seed)
    rows, full_dirs, est_dirs = [], [], []
    (inputs, grads, gmats), (inputs2, grads2, _) = stats
    for n, h in helpers.items():
        g, g2 = grads[n] * batch_size, grads2[n] * batch_size
        fa = [h.input_sum(inputs[n], torch.float32, m, gen) for m in (None, locations)]
        fg = [h.grad_sum(g, torch.float32, m, gen) for m in (None, locations)]
        (A1, A2), (G1, G2) = [[s / c for s, c in f] for f in (fa, fg)]
        if isinstance(h.module, torch.nn.Conv2d):
            a_other = h.input_sum(inputs2[n], torch.float32)
            g_other = h.grad_sum(g2, torch.float32)
            rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
            rows.append((rel(A2, A1), rel(G2, G1), rel(a_other[0] / a_other[1], A1), rel(g_other[0] / g_other[1], G1)))
        full_dirs.append(km.precondition_inverse(gmats[n], *km.inverse_pair(A1, G1, 0.01)).flatten())
        est_dirs.append(km.precondition_inverse(gmats[n], *km.inverse_pair(A2, G2, 0.01)).flatten())
    a, b = torch.cat(full_dirs), torch.cat(est_dirs)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    cols = list(zip(*rows))
    return {"net": net, "locations": locations, "A_median": med(cols[0]), "A_max": max(cols[0]),
            "G_median": med(cols[1]), "G_max": max(cols[1]), "A_batch": med(cols[2]), "G_batch": med(cols[3]),
            "cosine": (a.double() @ b.double() / (a.double().norm() * b.double().norm())).item()}


def _gloo_all_reduce(rank: int, world: int, port: int, sizes: list[int], reps: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    times = []
    for n in sizes:
        buf = torch.ones(n)
        dist.all_reduce(buf)  # warm-up
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(buf)
        times.append((time.perf_counter() - t0) / reps)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def communication(net: str, reps: int = 3) -> dict:
    """Bytes and gloo time (2 local processes) of one factor all-reduce, full vs upper triangles,
    and the decomposition load per rank with 1 vs 2 ranks (measured per-factor times, LPT placement)."""
    import socket

    import torch
    import torch.multiprocessing as mp

    from lightning_kfac_swa import kfac_math as km
    from lightning_kfac_swa.distributed import assign_by_cost
    from lightning_kfac_swa.kfac_layers import make_helper
    from lightning_kfac_swa.models import VGG16, PreResNet

    model = VGG16(100) if net == "vgg16" else PreResNet(110, 100)
    dims = []
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            h = make_helper(n, m)
            dims += [h.d_in, h.d_out]
    full = sum(d * d for d in dims) + len(dims)  # + the counts
    packed = sum(d * (d + 1) // 2 for d in dims) + len(dims)
    # decomposition (inverse route) time of every factor, then the LPT placement over ranks
    seconds = []
    for d in dims:
        f = torch.randn(d, d + 8)
        f = f @ f.T / d
        t0 = time.perf_counter()
        km.damped_inverse(f, 0.1)
        seconds.append(time.perf_counter() - t0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_all_reduce, args=(r, 2, port, [full, packed], reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    t_full, t_packed = q.get()
    for p in procs:
        p.join()
    owners = assign_by_cost([float(d) ** 3 for d in dims], 2)
    per_rank = [sum(t for t, o in zip(seconds, owners) if o == r) for r in range(2)]
    return {"net": net, "full_mb": 4 * full / 2**20, "packed_mb": 4 * packed / 2**20, "full_s": t_full,
            "packed_s": t_packed, "decomp_1": sum(seconds), "decomp_2": max(per_rank)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--methods", nargs="+", choices=("eigen", "inverse"), default=["eigen", "inverse"])
    parser.add_argument("--locations", nargs="+", type=int, default=[0],
                        help="conv_locations values to try (0 = every location)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=7, help="steps per training run (>= 7)")
    parser.add_argument("--rounds", type=int, default=2, help="K-FAC runs per configuration, each followed by SGD")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--accuracy", action="store_true",
                        help="instead of timing, measure what conv_locations costs in factor accuracy")
    parser.add_argument("--communication", action="store_true",
                        help="instead of timing steps, measure the DDP factor all-reduce and decomposition split")
    parser.add_argument("--fishers", nargs="+", choices=("mc", "empirical"), default=["mc"])
    parser.add_argument("--malloc-tuned", action="store_true",
                        help="run every configuration with glibc keeping freed memory (fewer page faults)")
    parser.add_argument("--thp", action="store_true",
                        help="run every configuration with THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU "
                             "allocations on transparent huge pages: 512x fewer page faults)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also split the factor step by K-FAC's profiler ranges (one extra, profiled run)")
    parser.add_argument("--one", nargs=4, metavar=("NET", "METHOD", "LOCATIONS", "FISHER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.communication:
        for net in args.nets:
            r = communication(net)
            print(f"{net:<13} factor all-reduce per update: full {r['full_mb']:.0f} MB in {r['full_s']:.2f} s, "
                  f"upper triangles {r['packed_mb']:.0f} MB in {r['packed_s']:.2f} s (gloo, 2 local processes); "
                  f"decompositions (inverse route) {r['decomp_1']:.2f} s on 1 rank, "
                  f"{r['decomp_2']:.2f} s on the busiest of 2 ranks", flush=True)
        return
    if args.accuracy:
        for net in args.nets:
            for m in [m for m in args.locations if m > 0] or [64]:
                r = factor_accuracy(net, m, args.batch_size)
                print(f"{net:<13} conv_locations={m}: relative error vs all locations, median (max) over conv layers: "
                      f"A {r['A_median']:.3f} ({r['A_max']:.3f}), G {r['G_median']:.3f} ({r['G_max']:.3f}); "
                      f"batch-to-batch difference of the full statistics: A {r['A_batch']:.3f}, G {r['G_batch']:.3f}; "
                      f"cosine of preconditioned gradients {r['cosine']:.4f}", flush=True)
        return
    if args.steps < 7:
        parser.error(f"--steps must be >= 7, got {args.steps}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        net, method, locations, fisher = args.one
        print(json.dumps(_run_one(net, method, args.batch_size, args.steps, int(locations), fisher, args.device,
                                  args.rounds, args.breakdown)))
        return

    for net in args.nets:
        configs = [("sgd", 0, "mc")] + [(m, s, f) for m in args.methods for s in args.locations for f in args.fishers]
        for method, locations, fisher in configs:
            cmd = [sys.executable, "-m", "lightning_kfac_swa.bench", "--one", net, method, str(locations), fisher,
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--device", args.device,
                   "--rounds", str(args.rounds)] + (["--breakdown"] if args.breakdown else [])
            env = dict(os.environ)
            if args.malloc_tuned:
                env.update(MALLOC_MMAP_THRESHOLD_=str(2**32), MALLOC_TRIM_THRESHOLD_=str(2**34))
            if args.thp:
                env.update(THP_MEM_ALLOC_ENABLE="1")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"benchmark configuration {net}/{method} failed")
            print(_format(json.loads(out.stdout.strip().splitlines()[-1])), flush=True)


def _format(r: dict) -> str:
    if r["method"] == "sgd":
        return (f"{r['net']:<13} sgd                                    step {r['plain_s']:.3f} s"
                f"                                                   peak {r['peak_gb']:.2f} GB")
    amort = r["plain_s"] + (r["factor_s"] - r["plain_s"]) / 10 + r["decomposition_s"] / 100
    loc = r["locations"] or "all"
    return (f"{r['net']:<13} kfac-{r['method']:<7} {r['fisher']:<9} locations={loc:<4} plain {r['plain_s']:.3f} s  "
            f"factor {r['factor_s']:.3f} s  decomposition {r['decomposition_s']:.2f} s  "
            f"amortised {amort:.3f} s = {amort / r['sgd_s']:.2f}x SGD (same process: {r['sgd_s']:.3f} s)  "
            f"peak {r['peak_gb']:.2f} GB" + _format_split(r.get("split")))


def _format_split(split: dict | None) -> str:
    if not split:
        return ""
    per_factor = "  ".join(f"{k} {v:.2f} s" for k, v in sorted(split.items()) if k != "precondition")
    return (f"\n{'':<13} per factor step (profiled run): {per_factor}; precondition "
            f"{split.get('precondition', 0.0):.3f} s per step")


if __name__ == "__main__":
    main()
