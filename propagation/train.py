"""Training experiments: one seeded, cached, resumable training run per :class:`Run`.

The paper's second half (trainability against depth, learning rate against batch size,
Regularised SkipInit) at a scale chosen by flags: the defaults fit two CPU cores (the
scikit-learn digits, 8x8), ``--dataset cifar10 --data-root DIR --device cuda`` and the
size flags scale up, and ``torchrun`` runs one run data-parallel over processes.

    from propagation import train
    result = train.run(train.Run(scheme="skipinit", depth=100, lr=0.05))
    results = train.run_all(runs, cache="figures/out/runs")   # cached, 2 worker processes

Command line (one run; prints the result as JSON):

    python -m propagation.train --scheme batchnorm --depth 16 --lr 0.1 --epochs 4
    torchrun --nproc_per_node 2 -m propagation.train --scheme skipinit --batch-size 512 ...

The network is :func:`propagation.nets.resnet_v2` with three stages of N pre-activation
basic blocks (widths w, 2w, 4w; strides 1, 2, 2), depth = 6 N + 4 layers as in a
Wide-ResNet (``width=16 k`` is WRN-depth-k), with ``scheme``'s blocks and a classifier head.

A run's result is a dict: ``train_loss`` (mean training loss over the last 10% of steps),
``test_loss``, ``test_acc`` (eval mode, whole test set), ``diverged`` (a loss became
non-finite or exceeded ``diverge_factor * ln(classes)``; training stops there),
``diverged_at``, ``steps``, ``steps_run``, ``curve`` (training loss, at most 256
bin-averaged points), ``seconds``, ``world_size`` and the run's settings.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from . import _checks
from . import data as _data

# Schemes the experiments train (those of the paper's tables); every scheme of
# nets.supported_schemes() trains, these are just the ones the figures use.
PAPER_SCHEMES = ("batchnorm", "fixup", "skipinit", "sqrt_half")


@dataclass(frozen=True)
class Run:
    """Everything that determines one training run (and its cache key).

    Attributes:
        scheme: a scheme with a reference network (``propagation.nets.supported_schemes()``).
        depth: layers, 6 N + 4 with N >= 1 blocks per stage (10, 16, 22, ..., 1000).
        width: stage-0 width w (stages w, 2w, 4w); 16 k is a WRN-depth-k.
        alpha: the scheme's alpha, for schemes that take one (skipinit, nf, nf_he; None:
            the scheme's default).
        regularised: Regularised SkipInit's additions: a learnable scalar bias before every
            convolution of every residual branch and dropout (``dropout``) before the
            classifier's linear layer.
        dropout: the dropout probability when ``regularised``.
        batch_size: examples per step (the global batch under torchrun).
        lr: peak learning rate of SGD with momentum.
        epochs: passes over the training set; steps = ceil(epochs * n_train / batch_size).
            Every step takes a full batch from a stream of per-epoch permutations.
        momentum, weight_decay: SGD's (weight decay on every parameter).
        schedule: "cosine" (decay to 0 over the run) or "constant".
        dataset: "digits" or "cifar10" (see :mod:`propagation.data`).
        augment: random crops (padding 4, or 1 for images under 16 pixels) and horizontal
            flips of the training images (off by default: digits are not mirror-symmetric).
        seed: initialisation seed; the data order uses 10000 + seed.
        device: "cpu", "cuda", "cuda:1", ...
        diverge_factor: a loss above diverge_factor * ln(classes) counts as divergence.
    """
    scheme: str = "batchnorm"
    depth: int = 16
    width: int = 8
    alpha: Optional[float] = None
    regularised: bool = False
    dropout: float = 0.2
    batch_size: int = 64
    lr: float = 0.1
    epochs: float = 4.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    dataset: str = "digits"
    augment: bool = False
    seed: int = 0
    device: str = "cpu"
    diverge_factor: float = 10.0

    def __post_init__(self):
        from .schemes import get_scheme, with_networks
        _checks.choice("scheme", self.scheme, tuple(with_networks()))
        depth = _checks.positive_int("depth", self.depth)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6 N + 4 layers with N >= 1 blocks per stage "
                             f"(10, 16, 22, ..., 1000), got depth={self.depth!r}")
        _checks.positive_int("width", self.width)
        if self.alpha is not None:
            if "alpha" not in get_scheme(self.scheme).params:
                raise ValueError(f"scheme={self.scheme!r} takes no alpha (got alpha="
                                 f"{self.alpha!r}); schemes with one: "
                                 + ", ".join(s for s in with_networks()
                                             if "alpha" in get_scheme(s).params))
            _checks.finite_float("alpha", self.alpha)
        if self.regularised and self.scheme != "skipinit":
            raise ValueError(f"regularised=True is Regularised SkipInit: it needs "
                             f"scheme='skipinit', got scheme={self.scheme!r}")
        _checks.finite_float("dropout", self.dropout, low=0.0)
        if self.dropout >= 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _checks.positive_int("batch_size", self.batch_size)
        if _checks.finite_float("lr", self.lr) <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if _checks.finite_float("epochs", self.epochs) <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        _checks.finite_float("momentum", self.momentum, low=0.0, high=1.0)
        _checks.finite_float("weight_decay", self.weight_decay, low=0.0)
        _checks.choice("schedule", self.schedule, ("cosine", "constant"))
        _checks.choice("dataset", self.dataset, _data.DATASETS)
        _checks.positive_int("seed", self.seed, allow_zero=True)
        if not isinstance(self.device, str) or self.device.split(":")[0] not in (
                "cpu", "cuda", "mps"):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', "
                             f"got {self.device!r}")
        if _checks.finite_float("diverge_factor", self.diverge_factor) <= 1:
            raise ValueError(f"diverge_factor must be > 1 (a multiple of the chance-level "
                             f"loss ln(classes)), got {self.diverge_factor!r}")

    @property
    def label(self):
        from .schemes import get_scheme
        if self.regularised:
            return f"regularised {self.scheme} (dropout {self.dropout:g})"
        spec = get_scheme(self.scheme)
        if "alpha" not in spec.params:
            return self.scheme
        alpha = spec.params["alpha"].default if self.alpha is None else self.alpha
        return f"{self.scheme} (alpha={alpha:g})"

    def to_dict(self):
        return dataclasses.asdict(self)


def steps_of(run, n_train):
    if run.batch_size > n_train:
        raise ValueError(f"batch_size={run.batch_size} exceeds the {n_train} training images "
                         f"of dataset={run.dataset!r}")
    return math.ceil(run.epochs * n_train / run.batch_size)


# --- the network ------------------------------------------------------------------------------

def build_model(run, in_channels, classes):
    """The run's network, initialised under ``torch.manual_seed(run.seed)``.

    Fixup's classifier starts at zero, as in Fixup (its residual branches already end in a
    zero layer). Regularised SkipInit inserts its biases and dropout (see :class:`Run`).
    """
    import torch
    from torch import nn
    from . import nets
    n = (run.depth - 4) // 6
    params = {} if run.alpha is None else {"alpha": run.alpha}
    torch.manual_seed(run.seed)
    model = nets.resnet_v2(stages=(n, n, n), width=run.width, scheme=run.scheme,
                           block="basic", in_channels=in_channels, num_classes=classes,
                           **params)
    linear = model.head[-1]
    from .schemes import get_scheme
    if get_scheme(run.scheme).zero_head:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    if run.regularised:
        for block in model.blocks:
            layers = []
            for m in block.branch:
                if isinstance(m, nn.Conv2d):
                    layers.append(nets._Bias())
                layers.append(m)
            block.branch = nn.Sequential(*layers)
        model.head = nn.Sequential(*list(model.head)[:-1], nn.Dropout(run.dropout), linear)
    return model


# --- one run ----------------------------------------------------------------------------------

def _world():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device="cpu"):
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), once: gloo on the
    CPU, nccl on CUDA. Returns (rank, world size); (0, 1) when not under torchrun."""
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        import atexit
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return _world()


def is_main_process():
    return _world()[0] == 0


def _augment(x, gen):
    """Random crop (zero padding p) and random horizontal flip, per image, vectorised."""
    import torch
    n, c, h, w = x.shape
    p = 4 if min(h, w) >= 16 else 1
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols)  # a flip reads the columns reversed
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + cols)[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def _batches(n_train, batch_size, steps, gen):
    """Step s's indices: a full batch from the stream of per-epoch permutations."""
    import torch
    need = steps * batch_size
    perms = [torch.randperm(n_train, generator=gen) for _ in range(-(-need // n_train))]
    stream = torch.cat(perms)
    return stream[:need].view(steps, batch_size)


def _downsample(values, points=256):
    if len(values) <= points:
        return list(range(len(values))), list(values)
    edges = [round(i * len(values) / points) for i in range(points + 1)]
    steps, means = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        chunk = values[a:b]
        steps.append((a + b - 1) / 2)
        means.append(sum(chunk) / len(chunk))
    return steps, means


def _evaluate(model, x, y, device, batch=1000):
    import torch
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(x[i:i + batch].to(device)).float()
            t = y[i:i + batch].to(device)
            loss += torch.nn.functional.cross_entropy(out, t, reduction="sum").item()
            correct += (out.argmax(1) == t).sum().item()
    return loss / len(y), correct / len(y)


def train(run, data=None, progress=True, position=0):
    """Train ``run`` (no cache) and return its result dict (see the module's docstring).

    Under torchrun (call :func:`init_distributed` first), every process takes an equal
    contiguous share of each global batch and DDP averages the gradients, so the update is
    the single-process one except for BatchNorm, whose statistics are then per process
    (batch_size / world size examples each, a "ghost batch").
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    if not isinstance(run, Run):
        raise TypeError(f"run must be a propagation.train.Run, got {type(run).__name__}")
    data = data if data is not None else _data.load(run.dataset)
    if data.name != run.dataset:
        raise ValueError(f"data is {data.name!r} but run.dataset={run.dataset!r}")
    rank, world = _world()
    if run.batch_size % world:
        raise ValueError(f"batch_size={run.batch_size} must be divisible by the number of "
                         f"processes ({world}) under torchrun")
    device = torch.device(run.device)
    # The whole data set on the device once (CIFAR-10 is 600 MB in float32): each step then
    # only gathers its batch there.
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    n_train = len(data.y_train)
    steps = steps_of(run, n_train)
    model = build_model(run, data.shape[0], data.classes).to(device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum,
                          weight_decay=run.weight_decay,
                          foreach=True)
    gen = torch.Generator().manual_seed(10_000 + run.seed)  # same order on every process
    order = _batches(n_train, run.batch_size, steps, gen)
    share = run.batch_size // world
    limit = run.diverge_factor * math.log(data.classes)
    losses, diverged_at = [], None
    started = time.perf_counter()
    net.train()
    bar = tqdm(total=steps, desc=f"{run.label}, depth {run.depth}, lr {run.lr:g}",
               unit="step", leave=False, position=position,
               disable=not progress or rank != 0, mininterval=0.5)
    for step in range(steps):
        if run.schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = run.lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        idx = order[step, rank * share:(rank + 1) * share].to(device)
        x, y = x_train[idx], y_train[idx]
        if run.augment:
            x = _augment(x, gen)
        loss = F.cross_entropy(net(x).float(), y)
        value = loss.detach()
        if world > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= world
        value = value.item()
        losses.append(value)
        if not math.isfinite(value) or value > limit:
            diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update()
    bar.close()
    seconds = time.perf_counter() - started
    test_loss, test_acc = _evaluate(model, data.x_test, data.y_test, device)
    tail = losses[-max(1, len(losses) // 10):]
    curve_steps, curve_loss = _downsample(losses)
    return {"run": run.to_dict(), "label": run.label, "steps": steps,
            "steps_run": len(losses) - (diverged_at is not None),
            "diverged": diverged_at is not None, "diverged_at": diverged_at,
            "train_loss": sum(tail) / len(tail), "test_loss": test_loss, "test_acc": test_acc,
            "curve": {"step": curve_steps, "loss": curve_loss},
            "seconds": round(seconds, 3), "world_size": world,
            "data": data.description, "torch": torch.__version__}


# --- cache and runner -------------------------------------------------------------------------

def _code_hash():
    """The source of what determines a result (this module, the data, the networks)."""
    from . import nets
    h = hashlib.sha256()
    for module in (sys.modules[__name__], _data, nets):
        with open(module.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


class Cache:
    """One JSON file per finished run in ``directory``, named by a hash of the run's
    settings, the torch version and the source of the code that trains it: editing that
    code, or changing torch, starts afresh; an interrupted grid continues where it stopped.
    """

    def __init__(self, directory):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"cache must be a folder path, got {directory!r}")
        self.directory = os.fspath(directory)
        self._code = None

    def key(self, run):
        import torch
        if self._code is None:
            self._code = _code_hash()
        blob = json.dumps({"run": run.to_dict(), "code": self._code, "torch": torch.__version__},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def path(self, run):
        return os.path.join(self.directory, self.key(run) + ".json")

    def get(self, run):
        try:
            with open(self.path(run)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # a partly written file from a killed process: redo the run

    def put(self, run, result):
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(run)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none


def run(run, cache=None, data_root=None, progress=True):
    """One run's result, from ``cache`` (a folder) when there, else trained and stored."""
    return run_all([run], cache=cache, workers=1, data_root=data_root, progress=progress)[0]


_WORKER: dict = {}


def _init_worker(slots, threads):
    import torch
    torch.set_num_threads(threads)
    _WORKER["slot"] = slots.get()


def _work(run, data_root, progress):
    data = _WORKER.get(run.dataset)
    if data is None:
        data = _WORKER[run.dataset] = _data.load(run.dataset, data_root)
    return train(run, data, progress=progress, position=1 + _WORKER["slot"])


def _cost(run):
    # Steps x layers: the per-layer overhead dominates at the sizes these experiments use.
    return run.epochs / run.batch_size * run.depth * (1 + run.batch_size / 64)


def run_all(runs, cache=None, workers=None, data_root=None, progress=True, desc="runs"):
    """Results of ``runs`` in order: cached ones read back, the rest trained and cached.

    Args:
        runs: a list of :class:`Run`.
        cache: a folder for the finished runs (None: no cache).
        workers: processes training at once (default: 2 on the CPU, capped by the CPU count,
            1 on a GPU); each uses one torch thread. Under torchrun every run is trained by
            all processes together instead.
        data_root: CIFAR-10's folder, for runs with dataset="cifar10".
        progress: a bar over runs, and one over the steps of each run being trained.
    """
    from tqdm.auto import tqdm
    runs = list(runs)
    for i, r in enumerate(runs):
        if not isinstance(r, Run):
            raise TypeError(f"runs[{i}] must be a propagation.train.Run, got {type(r).__name__}")
    store = Cache(cache) if cache is not None else None
    results = [store.get(r) if store else None for r in runs]
    # Unique runs in order of appearance, the costliest first (a stable sort): the last to
    # finish are short, so the workers end together.
    todo = list(dict.fromkeys(r for r, res in zip(runs, results) if res is None))
    todo.sort(key=_cost, reverse=True)
    rank, world = _world()
    if workers is None:
        gpu = any(r.device != "cpu" for r in todo)
        workers = 1 if gpu or world > 1 else max(1, min(2, os.cpu_count() or 1, len(todo)))
    workers = _checks.positive_int("workers", workers)
    bar = tqdm(total=len(set(runs)), initial=len(set(runs)) - len(todo), desc=desc,
               unit="run", disable=not progress or rank != 0)
    done = {}
    if world > 1:
        torch_dist().barrier()  # every process has read the cache before rank 0 writes to it
    if workers == 1 or world > 1:
        datasets = {}
        for r in todo:
            if r.dataset not in datasets:
                datasets[r.dataset] = _data.load(r.dataset, data_root)
            done[r] = train(r, datasets[r.dataset], progress=progress, position=1)
            if store and rank == 0:
                store.put(r, done[r])
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        ctx = multiprocessing.get_context("spawn")  # fork after torch's threads can hang
        slots = ctx.Queue()
        for i in range(workers):
            slots.put(i)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(slots, 1)) as pool:
            futures = {pool.submit(_work, r, data_root, progress): r for r in todo}
            for future in as_completed(futures):
                r = futures[future]
                done[r] = future.result()
                if store:
                    store.put(r, done[r])
                bar.update()
    bar.close()
    if world > 1 and store:
        torch_dist().barrier()
        done = {r: store.get(r) for r in done}  # rank 0's results, for every process
    return [res if res is not None else done[r] for r, res in zip(runs, results)]


def torch_dist():
    import torch.distributed as dist
    return dist


# --- command line -----------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(
        prog="python -m propagation.train",
        description="Train one residual network and print its result as JSON.",
        epilog="examples:\n"
               "  python -m propagation.train --scheme skipinit --depth 100 --lr 0.05\n"
               "  python -m propagation.train --scheme batchnorm --dataset cifar10 "
               "--data-root ~/data/cifar-10-batches-py --width 64 --epochs 200 --augment "
               "--device cuda\n"
               "  torchrun --nproc_per_node 2 -m propagation.train --scheme skipinit "
               "--batch-size 512",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Run()
    for f in dataclasses.fields(Run):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help="(default off)")
        else:
            kind = float if f.name == "alpha" else type(default)
            p.add_argument(flag, type=kind, default=default, help=f"(default {default})")
    p.add_argument("--data-root", default=None, help="CIFAR-10 folder (cifar-10-batches-py)")
    p.add_argument("--cache", default=None, help="folder of cached runs (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Run)}
    try:
        r = Run(**fields)
        init_distributed(r.device)
        result = run(r, cache=args.cache, data_root=args.data_root, progress=not args.quiet)
    except (TypeError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if is_main_process():
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
