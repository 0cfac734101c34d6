"""Benchmarks: the cost of measuring and predicting, as ratios against a baseline run in the
same process (time) or the same kind of fresh process (peak memory).

    python bench/run.py            # tables 1-5, 7, 8 (make bench): about 20 minutes on two cores
    python bench/run.py --quick    # small sizes, under a minute
    python bench/run.py --make     # table 6 only: `make test` and a cold `make figures` in a
                                   # temporary clone of HEAD (half an hour on two cores: the
                                   # figures include the training experiments)

Tables printed:
  1. measure (forward only) / bare forward, same model, input and mode (train, no_grad)
  2. measure (with gradients) / bare forward + backward
  3. peak memory of a forward-only measurement / a bare no-grad forward, per depth: the
     search (the first pass over a model) and its replay (every later pass)
  4. the common alternative (keep every block output, reduce afterwards): time and memory
  5. predict(D, scheme) for D = 10^3 .. 10^6
  6. (--make) wall time of `make test` and of a cold `make figures`
  7. (--zoo) real shapes: a ResNet-50-sized torchvision-style net and the Hugging Face
     transformers (width 256, 4 layers, 128 tokens, batch 8): replay, search and with
     gradients, each against the bare pass; --device cuda runs it on a GPU
  8. (--monitor) a training loop under propagation.monitor(every=100): off-steps, the
     sampled steps and the whole loop against the loop without it
  9. (--structural) predict(model, x), the structural theory, against one bare forward
 10. (--finite) predict(D, scheme, width, batch), the finite-width theory, against the
     infinite-width predict and against measuring one network of that width
 11. (--sequence) transformers: measure with the token correlation / the same measure
     without it, / a bare forward; and the sequence theory against one measure

Tables 1, 2 and 7 time `measure` after a first call on the same model, so they time the
replay; table 7's "search" column forces the search every pass (search="always").

Sizes. The issue asks for ResNet-V2s of width 64 at batch 64 and 32x32 with 100 and 1000
blocks. On two CPU cores one forward of that network at 1000 blocks takes minutes, and each
table needs repetitions, so `make bench` could not finish in its 10 minutes. The networks here
are pre-activation ResNet-V2s (basic blocks, one stage, BatchNorm, train mode) at two sizes,
printed with each table: width 16, batch 16, 16x16 images at 10, 100 and 1000 blocks (small
tensors: what the measurement's own per-call bookkeeping costs, at its worst) and width 64,
batch 8, 32x32 (the issue's layer sizes at a smaller batch: convolutions set the pace, as in
real use). Timings use one torch thread, interleave baseline and measurement and report the
median of the per-pair ratios after a warm-up, so that load from other processes on the
machine cancels as far as it can.

Memory: each number comes from a fresh process that first runs the same kind of pass on a
two-block copy of the network (so that one-time library initialisation is not counted), then
resets the peak resident set size (Linux /proc/self/clear_refs) and runs the real pass; the
number is the peak minus the resident size just before it. glibc is told to map every
allocation of 64 KiB or more on its own (MALLOC_MMAP_THRESHOLD_), so that freed tensors
leave the resident size at once and the peak is that of the live memory.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SMALL = (16, 16, 16)   # width, batch, image size
NEAR_REAL = (64, 8, 32)


def median_time(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired(base, other, reps):
    """(median time of base, median of other/base over interleaved pairs), after a warm-up."""
    base()
    other()
    t_base, ratios = [], []
    for i in range(reps):
        times = {}
        for f in ((base, other) if i % 2 == 0 else (other, base)):
            t = time.perf_counter()
            f()
            times[f] = time.perf_counter() - t
        t_base.append(times[base])
        ratios.append(times[other] / times[base])
    return statistics.median(t_base), statistics.median(ratios)


def build(depth, width):
    import torch
    from propagation import nets
    torch.manual_seed(0)
    return nets.resnet_v2(stages=(depth,), width=width, block="basic", scheme="batchnorm",
                          num_classes=10)


def inputs(batch, size):
    import torch
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


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
    """Run one pass in a fresh process; print the peak resident memory it added, in MiB."""
    import gc
    import torch
    import propagation
    torch.set_num_threads(1)
    x = inputs(batch, size)

    def run(model):
        if kind == "bare":
            with torch.no_grad():
                model(x)
        elif kind in ("measure", "replay"):
            propagation.measure(model, x, backward=False)
        elif kind == "store":
            store_everything(model, x)
    run(build(2, width))  # warm-up: kernels, caches and lazy imports are not the pass's memory
    model = build(depth, width)
    if kind == "replay":  # the search first (not counted): the pass measured is its replay
        run(model)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak resident set size (VmHWM) to the current one
    base = _status("VmRSS")
    run(model)
    print(json.dumps({"peak_mib": _status("VmHWM"), "base_mib": base}))


def peak(kind, depth, width, batch, size):
    # glibc: every allocation of 64 KiB or more is its own mapping, given back when freed, so
    # that the resident size follows the live tensors (by default freed activations stay in
    # the heap, and what a pass adds depends on what ran before it).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(depth), str(width),
                          str(batch), str(size)], capture_output=True, text=True, check=True,
                         env=env)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return d["peak_mib"] - d["base_mib"]  # what the pass added on top of model + input


def time_tables(quick):
    import torch
    import propagation
    print("\n1-2, 4. time of measure / bare pass of the same model and input "
          "(median of interleaved pairs)")
    print(f"{'blocks':>7} {'width':>6} {'batch':>6} {'size':>5} {'fwd bare s':>11} "
          f"{'measure fwd':>12} {'fwd+bwd bare s':>15} {'measure grad':>13} {'store-all fwd':>14}")
    if quick:
        configs = [(d, 8, 8, 8, 3) for d in (10, 100)]
    else:
        configs = [(d, *SMALL, 7) for d in (10, 100, 1000)]
        configs.append((100, *NEAR_REAL, 3))
    for depth, width, batch, size, reps in configs:
        model = build(depth, width)
        x = inputs(batch, size)

        def bare_fwd():
            with torch.no_grad():
                model(x)

        def bare_fwd_bwd():
            xx = x.detach().requires_grad_(True)
            out = model(xx)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
            torch.autograd.grad((g * out).sum(), [xx])
        t_fwd, r_mf = paired(bare_fwd, lambda: propagation.measure(model, x, backward=False), reps)
        t_fb, r_mg = paired(bare_fwd_bwd, lambda: propagation.measure(model, x), reps)
        _, r_st = paired(bare_fwd, lambda: store_everything(model, x), reps)
        print(f"{depth:7d} {width:6d} {batch:6d} {size:5d} {t_fwd:11.4f} {r_mf:11.3f}x "
              f"{t_fb:15.4f} {r_mg:12.3f}x {r_st:13.3f}x", flush=True)


def memory_tables(quick):
    print("\n3-4. peak memory added by one forward pass (fresh process each, after a warm-up), "
          "MiB and ratio")
    print(f"{'blocks':>7} {'width':>6} {'batch':>6} {'size':>5} {'bare no-grad':>13} "
          f"{'search fwd':>11} {'ratio':>7} {'replay fwd':>11} {'ratio':>7} {'store-all':>10} "
          f"{'ratio':>7}")
    sizes = [SMALL] if quick else [SMALL, NEAR_REAL]
    depths = (10, 100) if quick else (10, 100, 1000)
    for width, batch, size in sizes:
        for depth in depths:
            b, m, r, s = (peak(k, depth, width, batch, size)
                          for k in ("bare", "measure", "replay", "store"))
            print(f"{depth:7d} {width:6d} {batch:6d} {size:5d} {b:13.1f} {m:11.1f} {m / b:6.2f}x "
                  f"{r:11.1f} {r / b:6.2f}x {s:10.1f} {s / b:6.2f}x", flush=True)


def predict_table(quick):
    import propagation
    print("\n5. predict(D, scheme): time and ratio to numpy.arange(D), same process "
          "(median of 5 after a warm-up; of 1 where the warm-up took over 0.2 s)")
    sizes = (10 ** 3, 10 ** 4) if quick else (10 ** 3, 10 ** 4, 10 ** 5, 10 ** 6)
    print(f"{'scheme':>13} " + " ".join(f"{'D=%.0e' % d:>18}" for d in sizes))
    for name in propagation.schemes():
        cells = []
        for d in sizes:
            t_a = median_time(lambda: np.arange(d), 5)
            t = time.perf_counter()
            propagation.predict(d, name)
            reps = 1 if time.perf_counter() - t > 0.2 else 5
            t_p = median_time(lambda: propagation.predict(d, name), reps)
            cells.append(f"{t_p * 1e3:8.2f}ms {t_p / t_a:6.0f}x")
        print(f"{name:>13} " + " ".join(f"{c:>18}" for c in cells), flush=True)


def zoo_models(quick):
    """(name, model, inputs, channel axis): a ResNet-50-sized torchvision-style network and
    the Hugging Face transformers at small but realistic sizes (width 256, 4 layers,
    sequences of 128 tokens, batch 8), randomly initialised; the transformers need the
    ``zoo`` extra."""
    import torch
    from propagation import zoo
    torch.manual_seed(0)
    size, hidden, seq = (32, 64, 32) if quick else (64, 256, 128)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, size, size, generator=gen)
    out = [("resnet50 (tv, 64x64)" if not quick else "resnet50 (tv, 32x32)",
            zoo.TVResNet(zoo.TVBottleneck, [3, 4, 6, 3], width=64), images, 1)]
    if not zoo.available():
        print("  (transformers not installed: the zoo extra adds the transformer rows)")
        return out
    import transformers as tf
    tokens = {"input_ids": torch.randint(0, 1000, (8, seq), generator=gen),
              "attention_mask": torch.ones(8, seq, dtype=torch.long)}
    common = dict(num_hidden_layers=4, num_attention_heads=4, vocab_size=1000)
    out += [
        ("bert", tf.BertModel(tf.BertConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                                            **common), add_pooling_layer=False), tokens, -1),
        ("gpt2", tf.GPT2Model(tf.GPT2Config(n_embd=hidden, n_layer=4, n_head=4, vocab_size=1000,
                                            n_positions=seq)), tokens, -1),
        ("llama", tf.LlamaModel(tf.LlamaConfig(hidden_size=hidden, intermediate_size=688 * hidden
                                               // 256, num_key_value_heads=2, **common)),
         tokens, -1),
        ("vit (64 tokens)", tf.ViTModel(tf.ViTConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                                                     image_size=size, patch_size=size // 8,
                                                     num_hidden_layers=4, num_attention_heads=4),
                                        add_pooling_layer=False), images, -1),
    ]
    return out


def zoo_table(quick, device):
    """measure / bare forward on real shapes: replay (the search cached), the search itself,
    and with gradients."""
    import torch
    import propagation
    from propagation import zoo
    from propagation.empirical import _call, _check_input
    print(f"\n7. real shapes on {device}: measure / bare pass of the same model, input and "
          "mode (init: norms on batch statistics, dropout off); median of interleaved pairs")
    print(f"{'model':>22} {'fwd bare s':>11} {'measure fwd':>12} {'search fwd':>11} "
          f"{'fwd+bwd bare s':>15} {'measure grad':>13}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    reps = 3 if quick else 5
    for name, model, x, axis in zoo_models(quick):
        model = model.to(device)
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
        zoo.init_mode(model)
        xx, kw = _check_input(x, model, axis)

        def bare_fwd():
            with torch.no_grad():
                _call(model, xx, kw)
            sync()

        embedded = []  # token models: the gradient goes back to the embeddings' output

        def keep(module, args, out):
            embedded.append(out)
        tokens = not xx.is_floating_point()

        def bare_fwd_bwd():
            inp = xx if tokens else xx.detach().requires_grad_(True)
            handle = model.get_input_embeddings().register_forward_hook(keep) if tokens else None
            try:
                out = _call(model, inp, kw)
            finally:
                if handle is not None:
                    handle.remove()
            out = out if isinstance(out, torch.Tensor) else out[0]
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(device)
            torch.autograd.grad((g * out).sum(), [embedded.pop()] if tokens else [inp])
            sync()

        def run(**kw_):
            propagation.measure(model, x, channel_axis=axis, **kw_)
            sync()
        t_fwd, r_fwd = paired(bare_fwd, lambda: run(backward=False), reps)
        _, r_search = paired(bare_fwd, lambda: run(backward=False, search="always"), reps)
        t_fb, r_grad = paired(bare_fwd_bwd, lambda: run(), reps)
        print(f"{name:>22} {t_fwd:11.4f} {r_fwd:11.3f}x {r_search:10.3f}x {t_fb:15.4f} "
              f"{r_grad:12.3f}x", flush=True)


def monitor_table(quick):
    """A training loop with and without propagation.monitor(every=100): each step timed."""
    import torch
    import torch.nn.functional as F
    import propagation
    from propagation import nets
    steps = 120 if quick else 200
    print(f"\n8. training with monitor(every=100): {steps} SGD steps of a 10-block ResNet-V2 "
          "(width 32, batch 32, 16x16), each step timed; ratios to the median step without")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 16, 16, generator=gen), torch.randint(0, 10, (32,), generator=gen)

    def loop(monitored):
        torch.manual_seed(0)
        model = nets.resnet_v2((10,), width=32, scheme="batchnorm", block="basic",
                               num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        times = []
        ctx = propagation.monitor(model, every=100) if monitored else None
        if ctx is not None:
            ctx.__enter__()
        try:
            for _ in range(steps):
                t = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        return times
    loop(False)  # warm-up
    base, mon = [], []
    for i in range(2):  # interleaved
        for monitored in ((False, True) if i % 2 == 0 else (True, False)):
            (mon if monitored else base).append(loop(monitored))
    step = statistics.median(t for run in base for t in run)
    off = statistics.median(t for run in mon for k, t in enumerate(run) if k % 100)
    search = statistics.median(run[0] for run in mon)
    replay = statistics.median(t for run in mon for k, t in enumerate(run) if k and k % 100 == 0)
    total = statistics.median(sum(r) for r in mon) / statistics.median(sum(r) for r in base)
    print(f"  step without {step * 1e3:.2f} ms; off-step {off / step:.3f}x; sampled step: "
          f"first (search) {search / step:.2f}x, later (replay) {replay / step:.3f}x; whole "
          f"loop {total:.4f}x", flush=True)


def structural_table(quick):
    """Table 9: predict(model, x), the structural theory, against one bare forward pass of
    the same model and batch (train mode, no_grad): the ResNet-50-sized torchvision-style
    network at batch 32 (8 with --quick) and a Hugging Face ConvNeXt."""
    import torch
    import propagation
    from propagation import zoo
    torch.manual_seed(0)
    size, batch = (32, 8) if quick else (64, 32)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    rows = [(f"resnet50 (tv, {size}x{size}, batch {batch})",
             zoo.TVResNet(zoo.TVBottleneck, [3, 4, 6, 3], width=64))]
    if zoo.available():
        from transformers import ConvNextConfig, ConvNextModel
        rows.append((f"convnext-tiny-ish (96..768, [3,3,9,3], {size}x{size}, batch {batch})",
                     ConvNextModel(ConvNextConfig(hidden_sizes=[96, 192, 384, 768],
                                                  depths=[3, 3, 9, 3]))))
    from propagation import structural
    print("\n9. predict(model, x) (structural theory) / one bare forward, same model and batch;"
          "\n   cold: the weights read (a model's first predict), warm: their moments cached")
    for name, model in rows:
        model.train()

        def bare(model=model):
            with torch.no_grad():
                model(x)

        def cold(model=model):
            structural.clear_cache()
            propagation.predict(model, x)

        def warm(model=model):
            propagation.predict(model, x)
        warm()  # first call: imports and the quadrature tables
        reps = 3 if quick else 5
        t_base, r_cold = paired(bare, cold, reps)
        _, r_warm = paired(bare, warm, reps)
        print(f"  {name:<58} cold {r_cold:5.2f}x  warm {r_warm:5.2f}x   (bare forward "
              f"{t_base * 1e3:7.1f} ms)", flush=True)


def finite_table(quick):
    """Table 10: the finite-width theory's cost. predict(D, scheme, width=128, batch=128)
    against predict(D, scheme) (the infinite-width profile it extends) and against one
    measure() of the same residual MLP (forward and backward), the empirical alternative
    being one such measurement per seed."""
    import torch
    import propagation
    from propagation import finite, nets
    depths = (10, 100) if quick else (100, 1000)
    width = 128
    print(f"\n10. predict(D, scheme, width={width}, batch={width}) / predict(D, scheme) and / one "
          f"measure of that MLP\n    (fresh caches each call: the one-channel moments are "
          f"recomputed)")
    for scheme in ("batchnorm", "none", "layernorm", "nf"):
        for d in depths:
            model = nets.residual_mlp(d, width=width, scheme=scheme)
            x = torch.randn(width, width, generator=torch.Generator().manual_seed(1))
            dtype = torch.float64 if scheme == "none" and d >= 1000 else None
            if dtype is not None:  # 2^1000 does not fit in float32
                x = x.to(dtype)
            propagation.measure(model, x, progress=False, dtype=dtype)  # the search, once

            def infinite(d=d, scheme=scheme):
                propagation.predict(d, scheme)

            def spread(d=d, scheme=scheme):
                for cached in (finite._channel_covariance, finite._noise, finite._relu_pair,
                               finite._relu_row):
                    cached.cache_clear()
                propagation.predict(d, scheme, width=width, batch=width)

            def measured(model=model, x=x, dtype=dtype):
                propagation.measure(model, x, progress=False, dtype=dtype)
            t_inf, r_inf = paired(infinite, spread, 3)
            t_meas, r_meas = paired(measured, spread, 3)
            print(f"  {scheme:>10} D={d:<5} spread {t_inf * r_inf * 1e3:8.1f} ms = "
                  f"{r_inf:7.0f}x predict, {r_meas:5.2f}x one measure "
                  f"({t_meas * 1e3:7.1f} ms)", flush=True)


def sequence_table(quick):
    """Table 11: transformers. The token correlation's share of measure (the same replayed
    forward-and-backward measurement with _token_cosine switched off as the baseline), measure
    against a bare forward + backward, and predict(L, scheme, tokens=T) against one measure
    of the reference transformer of L layers (width 256, batch 8, T tokens)."""
    import torch
    import propagation
    from propagation import empirical, nets
    sizes = ((4, 32), (12, 128)) if quick else ((12, 32), (12, 128), (64, 32))
    width, batch = 256, 8
    print(f"\n11. transformers (nets.transformer, width {width}, batch {batch}, pre-LN; "
          f"forward + backward)")
    real = empirical._token_cosine
    for layers, T in sizes:
        torch.manual_seed(0)
        model = nets.transformer(layers, width=width)
        x = torch.randn(batch, T, width, generator=torch.Generator().manual_seed(1))
        propagation.measure(model, x, channel_axis=-1)  # the search, once

        def with_tokens():
            propagation.measure(model, x, channel_axis=-1)

        def without_tokens():
            empirical._token_cosine = lambda t, axis: float("nan")
            try:
                propagation.measure(model, x, channel_axis=-1)
            finally:
                empirical._token_cosine = real

        def bare():
            model.zero_grad(set_to_none=True)
            out = model(x)
            (out * torch.randn_like(out)).sum().backward()

        def theory():
            propagation.predict(layers, "transformer_preln", tokens=T)
        t_off, r_tok = paired(without_tokens, with_tokens, 5)
        t_bare, r_meas = paired(bare, with_tokens, 5)
        t_meas, r_theory = paired(with_tokens, theory, 3)
        print(f"  L={layers:<3} T={T:<4} tokens on / off {r_tok:5.3f}x   measure / bare "
              f"{r_meas:5.2f}x ({t_bare * 1e3:7.1f} ms bare)   predict / measure {r_theory:6.3f}x "
              f"({t_meas * r_theory * 1e3:7.1f} ms)", flush=True)


def positions_table(quick):
    """Table 12: the position theory's cost. predict(..., positions=) of a gate conv net
    (ResNet-V2 basic blocks, width 32, batch 8, half the blocks at 32x32 and half at 16x16)
    against the mean padding factor's predict and against one measure() of the network
    (forward and backward), of which the gate takes three."""
    import torch
    import propagation
    from propagation import nets
    shape = (8, 3, 32, 32)
    print("\n12. predict(..., positions=) / predict(..., padding_factors=) and / one measure, "
          "conv ResNet-V2 width 32, batch 8x3x32x32")
    for scheme in ("batchnorm", "nf"):
        for d in ((4,) if quick else (10, 100)):
            model = nets.resnet_v2(stages=(d - d // 2, d // 2), width=32, scheme=scheme,
                                   block="basic", num_classes=None)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
            geo = nets.conv_geometry(model, shape)
            factors = nets.padding_factors(model, shape)
            propagation.measure(model, x, progress=False)  # the search, once

            def positions(model=model, geo=geo):
                propagation.predict(**model.theory, positions=geo)

            def mean_factor(model=model, factors=factors):
                propagation.predict(**model.theory, padding_factors=factors)

            def measured(model=model, x=x):
                propagation.measure(model, x, progress=False)
            t_mf, r_mf = paired(mean_factor, positions, 1 if d >= 100 else 3)
            t_meas, r_meas = paired(measured, positions, 1 if d >= 100 else 3)
            print(f"  {scheme:>10} D={d:<4} positions {t_mf * r_mf:6.2f} s = {r_mf:6.0f}x the "
                  f"mean factor, {r_meas:5.2f}x one measure ({t_meas:5.2f} s)", flush=True)


def make_tables():
    """Table 6: `make test` and a cold `make figures` in a temporary clone of HEAD.

    The clone reuses this checkout's .venv (symlinked; the clone's setup.cfg and
    pyproject.toml are dated back so that make does not reinstall into it) and puts the
    clone first on PYTHONPATH: the time is the suite's and the figures', not pip's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = os.path.join(root, ".venv")
    if not os.path.exists(os.path.join(venv, ".installed")):
        sys.exit("--make needs an installed .venv in this checkout: run `make setup` first")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                          capture_output=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="propagation-bench-") as tmp:
        clone = os.path.join(tmp, "clone")
        subprocess.run(["git", "clone", "-q", root, clone], check=True)
        os.symlink(venv, os.path.join(clone, ".venv"))
        for name in ("setup.cfg", "pyproject.toml"):
            os.utime(os.path.join(clone, name), (0, 0))
        env = {**os.environ, "PYTHONPATH": clone}
        print(f"\n6. wall time in a fresh clone of HEAD ({head}), reusing .venv")
        for target in ("test", "figures"):
            t = time.perf_counter()
            done = subprocess.run(["make", target], cwd=clone, env=env, capture_output=True,
                                  text=True)
            dt = time.perf_counter() - t
            tail = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else [""]
            print(f"  make {target:<8} {dt:7.1f} s  exit {done.returncode}  {tail[0][:90]}",
                  flush=True)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
        shutil.rmtree(clone, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--make", action="store_true",
                        help="only table 6: time make test and a cold make figures")
    parser.add_argument("--zoo", action="store_true", help="only table 7: the real shapes")
    parser.add_argument("--monitor", action="store_true", help="only table 8: monitoring")
    parser.add_argument("--structural", action="store_true",
                        help="only table 9: predict(model, x) against a bare forward")
    parser.add_argument("--finite", action="store_true",
                        help="only table 10: the finite-width theory's cost")
    parser.add_argument("--sequence", action="store_true",
                        help="only table 11: transformers (token correlation, sequence theory)")
    parser.add_argument("--positions", action="store_true",
                        help="only table 12: the position theory of conv nets")
    parser.add_argument("--device", default="cpu", help="device for table 7 (cpu or cuda)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *nums = args.child
        return child(kind, *map(int, nums))
    if args.make:
        return make_tables()

    import torch
    torch.set_num_threads(1)  # one thread: stable timings on a shared two-core machine
    if args.device not in ("cpu", "cuda") or (args.device == "cuda"
                                               and not torch.cuda.is_available()):
        parser.error(f"--device must be cpu or cuda (with a GPU present), got {args.device!r}")
    if args.zoo:
        return zoo_table(args.quick, args.device)
    if args.monitor:
        return monitor_table(args.quick)
    if args.structural:
        return structural_table(args.quick)
    if args.finite:
        return finite_table(args.quick)
    if args.sequence:
        return sequence_table(args.quick)
    if args.positions:
        return positions_table(args.quick)
    start = time.perf_counter()
    print("ResNet-V2 basic blocks, batchnorm, train mode, 1 torch thread; sizes as printed "
          "(width, batch, image size; see the module docstring for why)")
    time_tables(args.quick)
    memory_tables(args.quick)
    predict_table(args.quick)
    zoo_table(args.quick, args.device)
    monitor_table(args.quick)
    structural_table(args.quick)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
