"""Signal propagation during training: the statistics of ``measure`` at sampled steps.

    with propagation.monitor(model, every=100, log="propagation.jsonl") as mon:
        for x, y in loader:
            loss = criterion(model(x), y)
            loss.backward()          # the real loss's gradients reach the merges
            opt.step(); opt.zero_grad()
    mon.profiles                     # {step: Profile}
    mon.plot("skip", "second_moment")

A *step* is a forward call of ``model`` in training mode with gradients enabled (eval and
no-grad passes inside the loop are not counted). On a sampled step the forward pass runs
with the merge hooks (the first sampled step searches the call graph, later ones replay that
search: see ``measure(search=...)``), and the gradient hooks on the skip path record the
gradients of whatever the caller backpropagates. Between sampled steps the model carries one
forward pre-hook that counts calls and returns: nothing else runs.

The model is measured as it trains (``mode="keep"``: Dropout and stochastic depth as the
caller set them), the gradients are those of the caller's loss (``Profile.readout ==
"loss"``), normalised like ``measure``'s to the last merge's sum.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from typing import Dict, Optional

import torch

from . import _checks
from .empirical import _PLANS, _Recorder, _first_tensor_arg, _is_compiled, _replay, _search
from .profile import Profile

__all__ = ["monitor", "Monitor"]


def monitor(model: torch.nn.Module, every: int = 100, *, channel_axis: int = 1,
            log: Optional[str] = None, first: int = 0) -> "Monitor":
    """Record ``measure``'s statistics at every ``every``-th training step of ``model``.

    Args:
        model: the ``nn.Module`` being trained (the one whose forward the loop calls).
        every: sample one step in ``every`` (steps first, first + every, ...).
        channel_axis: 1 for (N, C, ...) activations, -1 for token sequences.
        log: a path; each sampled step appends one JSON line ``{"step", "profile"}``
            (``Profile.to_dict``) when its gradients are in (at the next step, or on exit).
        first: the first step to sample (0: the first training step).

    Returns: a :class:`Monitor`, to use as a context manager (the hooks live inside it).
    """
    return Monitor(model, every, channel_axis=channel_axis, log=log, first=first)


class Monitor:
    """See :func:`monitor`. Attributes: ``profiles`` ({step: Profile}), ``step`` (the steps
    counted so far)."""

    def __init__(self, model, every=100, *, channel_axis=1, log=None, first=0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if _is_compiled(model):
            raise TypeError("monitor cannot see inside a torch.compile'd model (its forward is "
                            "generated code); monitor the module before compiling it, or call "
                            "propagation.measure(model._orig_mod, batch, loss=...) every N steps "
                            "(it measures the same parameters eagerly)")
        self.model = model
        self.every = _checks.positive_int("every", every)
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ValueError(f"first must be an int >= 0, got {first!r}")
        self.first = first
        if not isinstance(channel_axis, int) or isinstance(channel_axis, bool):
            raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
        self.channel_axis = channel_axis
        if log is not None and not isinstance(log, (str, os.PathLike)):
            raise TypeError(f"log must be a path or None, got {log!r}")
        self.log = log
        self.profiles: Dict[int, Profile] = {}
        self.step = 0
        self._handles = []
        self._pass = None      # (step, recorder, context, sites or None, key) while sampling
        self._pending = None   # (step, recorder) waiting for its gradients
        self._warned = False

    # --- the context ------------------------------------------------------------------------

    def __enter__(self):
        if self._handles:
            raise RuntimeError("this monitor is already active")
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._pass is not None:  # a forward pass that never returned
            self._pass[2].__exit__(None, None, None)
            self._pass[1].release()
            self._pass = None
        self._finish()
        return False

    # --- hooks ------------------------------------------------------------------------------

    def _sampled(self, step):
        return step >= self.first and (step - self.first) % self.every == 0

    def _pre(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()) or self._pass is not None:
            return None
        if self._pending is not None:
            self._finish()  # the previous sampled step's backward pass has run by now
        step = self.step
        self.step += 1
        if not self._sampled(step):
            return None
        x = _first_tensor_arg(args, kwargs)
        if x is None:
            return None
        recorder = _Recorder(self.channel_axis)
        key = ("monitor", tuple(x.shape), x.dtype, tuple(sorted(kwargs)))
        sites = _PLANS.get(self.model, {}).get(key)
        ctx = _replay(self.model, recorder, sites) if sites else _search(self.model, recorder,
                                                                          None)
        # The search's finder, or the replay's mode.
        self._pass = (step, recorder, ctx, sites, key, ctx.__enter__())
        return None

    def _post(self, module, args, kwargs, out):
        if self._pass is None:
            return None
        step, recorder, ctx, sites, key, state = self._pass
        self._pass = None
        ctx.__exit__(None, None, None)
        if sites is not None and not state.complete:
            # The structure differs from the search's (another branch of the forward was
            # taken): drop this sample and search again at the next sampled step.
            recorder.release()
            _PLANS.get(self.model, {}).pop(key, None)
            self._warn(f"step {step}: the merges differ from the first sampled step's; this "
                       f"step is skipped and the next sampled step searches again")
            return None
        if sites is None and (plan := state.plan()) is not None:
            _PLANS.setdefault(self.model, {})[key] = plan
        if not recorder.merges:
            recorder.release()
            self._warn(f"step {step}: no residual merge was seen in the forward pass")
            return None
        self._pending = (step, recorder)
        return None

    def _warn(self, text):
        if not self._warned:
            warnings.warn(text, RuntimeWarning, stacklevel=3)
            self._warned = True

    def _finish(self):
        if self._pending is None:
            return
        step, recorder = self._pending
        self._pending = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no backward yet: NaN gradients
            profile = recorder.profile(mode="keep", readout="loss" if recorder.grads else None,
                                       dtype="", step=step)
        recorder.release()
        self.profiles[step] = profile
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps({"step": step, "profile": profile.to_dict()}) + "\n")

    # --- outputs ----------------------------------------------------------------------------

    def to_csv(self, path):
        """One row per sampled step, merge, part and quantity (log2 values)."""
        self._finish()
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "block", "name", "part", "quantity", "log2_value"])
            for step, p in sorted(self.profiles.items()):
                for part in ("skip", "branch", "grad"):
                    stats = getattr(p, part)
                    for quantity in ("second_moment", "squared_mean", "variance"):
                        for block, v in enumerate(getattr(stats, f"log2_{quantity}")):
                            name = p.names[block] if p.names and block < len(p.names) else ""
                            w.writerow([step, block, name, part, quantity,
                                        "" if math.isnan(v) else repr(float(v))])

    def to_json(self, path):
        """{step: Profile.to_dict()} as one JSON file."""
        self._finish()
        with open(path, "w") as f:
            json.dump({str(s): p.to_dict() for s, p in sorted(self.profiles.items())}, f)

    def plot(self, part="skip", quantity="second_moment", ax=None):
        """A statistic against training step, one line per block (colour: depth)."""
        from .plot import plot_training
        self._finish()
        return plot_training(self.profiles, part=part, quantity=quantity, ax=ax)


def read_log(path) -> Dict[int, Profile]:
    """The profiles a monitor's ``log`` file holds, {step: Profile}."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out[int(d["step"])] = Profile.from_dict(d["profile"])
    return out
