"""Benchmark: per-step cost of SGD vs SGD + KFAC on the paper's networks.

    python -m lightning_kfac_swa.bench                      # both networks, CPU or CUDA
    python -m lightning_kfac_swa.bench --nets preresnet110 --methods inverse

Each configuration runs in its own subprocess (so peak memory is its own) through a real
``lightning.Trainer`` on synthetic CIFAR-shaped data (batch 128, 100 classes). Steps are
split by kind: *plain* (preconditioning only), *factor* (plus factor statistics) and the
*decomposition* (timed separately). The amortised figure assumes the paper's intervals:
factors every 10 steps, decompositions every 100:

    amortised = plain + (factor - plain) / 10 + decomposition / 100

Peak memory is the process's maximum resident set size on CPU, ``max_memory_allocated`` on CUDA.
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


def _run_one(net: str, method: str, batch_size: int, steps: int, stride: int, device: str) -> dict:
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
        def __init__(self):
            self.times = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * steps, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (batch_size * steps,), generator=g)
    timer = Timer()
    callbacks: list = [timer]
    kfac = None
    # factor steps at 0, 3, 6, ...: step 0 also decomposes (timed apart below)
    if method != "sgd":
        kfac = KFAC(method=method, factor_update_interval=3, inverse_update_interval=10**9,
                    conv_location_stride=stride)
        callbacks.insert(0, kfac)
    trainer = pl.Trainer(accelerator=device, devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(Bench(), DataLoader(TensorDataset(x, y), batch_size=batch_size))
    times = timer.times[1:]  # step 0 includes warm-up and the first decomposition
    if kfac is None:
        plain, factor = statistics.median(times), None
    else:
        idx = range(1, len(timer.times))
        plain = statistics.median([timer.times[i] for i in idx if i % 3])
        factor = statistics.median([timer.times[i] for i in idx if i % 3 == 0])
    decomposition = None
    if kfac is not None:
        t0 = time.perf_counter()
        kfac._decompose()  # noqa: SLF001 - the benchmark times the callback's own routine
        if device == "cuda":
            torch.cuda.synchronize()
        decomposition = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"net": net, "method": method, "stride": stride, "plain_s": plain, "factor_s": factor,
            "decomposition_s": decomposition, "peak_gb": peak, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--methods", nargs="+", choices=("eigen", "inverse"), default=["eigen", "inverse"])
    parser.add_argument("--strides", nargs="+", type=int, default=[1],
                        help="conv_location_stride values to try (1 = every location)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=7, help="steps per configuration (>= 7)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--one", nargs=3, metavar=("NET", "METHOD", "STRIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 7:
        parser.error(f"--steps must be >= 7, got {args.steps}")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        net, method, stride = args.one
        print(json.dumps(_run_one(net, method, args.batch_size, args.steps, int(stride), args.device)))
        return

    rows = []
    for net in args.nets:
        configs = [("sgd", 1)] + [(m, s) for m in args.methods for s in args.strides]
        for method, stride in configs:
            cmd = [sys.executable, "-m", "lightning_kfac_swa.bench", "--one", net, method, str(stride),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"benchmark configuration {net}/{method} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(_format(rows[-1], rows), flush=True)


def _format(r: dict, rows: list[dict]) -> str:
    sgd = next(x for x in rows if x["net"] == r["net"] and x["method"] == "sgd")["plain_s"]
    if r["method"] == "sgd":
        return (f"{r['net']:<13} sgd              step {r['plain_s']:.3f} s"
                f"                                                   peak {r['peak_gb']:.2f} GB")
    amort = r["plain_s"] + (r["factor_s"] - r["plain_s"]) / 10 + r["decomposition_s"] / 100
    return (f"{r['net']:<13} kfac-{r['method']:<7} s={r['stride']} plain {r['plain_s']:.3f} s  "
            f"factor {r['factor_s']:.3f} s  decomposition {r['decomposition_s']:.2f} s  "
            f"amortised {amort:.3f} s = {amort / sgd:.2f}x SGD  peak {r['peak_gb']:.2f} GB")


if __name__ == "__main__":
    main()
