"""Benchmarks: the cost of measuring and predicting, as ratios against a baseline run in the
same process (time) or the same kind of fresh process (peak memory).

    python bench/run.py            # everything, a few minutes on two cores
    python bench/run.py --quick    # small sizes, seconds

Tables printed:
  1. measure (forward only) / bare forward, same model, input and mode (train, no_grad)
  2. measure (with gradients) / bare forward + backward
  3. peak RSS of a forward-only measurement / a bare no-grad forward, per depth
  4. the common alternative (keep every block output, reduce afterwards): time and memory
  5. predict(D, scheme) for D = 10^3 .. 10^6 / numpy.arange(D)
Times are medians of several repetitions after a warm-up. The networks are pre-activation
ResNet-V2s (basic blocks, one stage) scaled to two CPU cores: the width, batch and image
size are printed with each table.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np


def median_time(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(depth, width):
    import torch
    from propagation import nets
    torch.manual_seed(0)
    return nets.resnet_v2(stages=(depth,), width=width, block="basic", scheme="batchnorm",
                          num_classes=10)


def store_everything(model, x):
    """The usual alternative: keep every block output, compute statistics afterwards."""
    import torch
    outs = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
        return [torch.var_mean(o, dim=(0, 2, 3)) for o in outs]
    finally:
        for h in handles:
            h.remove()


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind, depth, width, batch, size):
    """Run one forward in a fresh process; print the peak RSS it added, in MiB."""
    import gc
    import torch
    import propagation
    torch.set_num_threads(1)
    model = build(depth, width)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak resident set size (VmHWM) to the current one
    base = _status("VmRSS")
    if kind == "bare":
        with torch.no_grad():
            model(x)
    elif kind == "measure":
        propagation.measure(model, x, backward=False)
    elif kind == "store":
        store_everything(model, x)
    print(json.dumps({"peak_mib": _status("VmHWM"), "base_mib": base}))


def peak(kind, depth, width, batch, size):
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(depth), str(width),
                          str(batch), str(size)], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return d["peak_mib"] - d["base_mib"]  # what the forward added on top of model + input


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *nums = args.child
        return child(kind, *map(int, nums))

    import torch
    import propagation
    torch.set_num_threads(1)  # one thread: stable timings on a shared two-core machine
    width, batch, size = (8, 8, 8) if args.quick else (16, 16, 16)
    depths = (10, 100) if args.quick else (10, 100, 1000)
    reps = 3 if args.quick else 5
    print(f"ResNet-V2 basic blocks, batchnorm, width {width}, batch {batch}, {size}x{size}, "
          f"train mode, 1 thread, median of {reps}")

    print("\n1-2. time of measure / bare pass of the same model and input")
    print(f"{'blocks':>7} {'width':>6} {'batch':>6} {'size':>5} {'fwd bare s':>11} "
          f"{'measure fwd':>12} {'fwd+bwd bare s':>15} {'measure grad':>13} {'store-all fwd':>14}")
    # The small configuration at every depth, and one nearer real use (width 64, 32x32),
    # where the convolutions, not the per-call bookkeeping, set the pace.
    configs = [(d, width, batch, size, reps) for d in depths]
    if not args.quick:
        configs.append((100, 64, 8, 32, 3))
    for depth, width_, batch_, size_, reps_ in configs:
        model = build(depth, width_)
        x = torch.randn(batch_, 3, size_, size_, generator=torch.Generator().manual_seed(1))

        def bare_fwd():
            with torch.no_grad():
                model(x)

        def bare_fwd_bwd():
            xx = x.detach().requires_grad_(True)
            out = model(xx)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
            torch.autograd.grad((g * out).sum(), [xx])
        t_fwd = median_time(bare_fwd, reps_)
        t_mf = median_time(lambda: propagation.measure(model, x, backward=False), reps_)
        t_fb = median_time(bare_fwd_bwd, reps_)
        t_mg = median_time(lambda: propagation.measure(model, x), reps_)
        t_st = median_time(lambda: store_everything(model, x), reps_)
        print(f"{depth:7d} {width_:6d} {batch_:6d} {size_:5d} {t_fwd:11.4f} {t_mf / t_fwd:11.3f}x "
              f"{t_fb:15.4f} {t_mg / t_fb:12.3f}x {t_st / t_fwd:13.3f}x")

    print("\n3-4. peak memory added by one forward pass (fresh process each), MiB and ratio")
    print(f"{'blocks':>7} {'bare no-grad':>13} {'measure fwd':>12} {'ratio':>7} "
          f"{'store-all':>10} {'ratio':>7}")
    for depth in depths:
        b, m, s = (peak(k, depth, width, batch, size) for k in ("bare", "measure", "store"))
        print(f"{depth:7d} {b:13.1f} {m:12.1f} {m / b:6.2f}x {s:10.1f} {s / b:6.2f}x")

    print("\n5. predict(D, scheme) / numpy.arange(D), same process")
    sizes = (10 ** 3, 10 ** 4) if args.quick else (10 ** 3, 10 ** 4, 10 ** 5, 10 ** 6)
    print(f"{'scheme':>13} " + " ".join(f"{'D=%.0e' % d:>16}" for d in sizes))
    for name in propagation.schemes():
        cells = []
        for d in sizes:
            t_a = median_time(lambda: np.arange(d), reps)
            t_p = median_time(lambda: propagation.predict(d, name), 1 if d >= 10 ** 5 else reps)
            cells.append(f"{t_p * 1e3:7.1f}ms {t_p / t_a:6.0f}x")
        print(f"{name:>13} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
