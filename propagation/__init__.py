"""propagation: predict, measure and compare signal propagation in residual networks.

``predict`` (theory) and ``measure`` (a real PyTorch network) return the same
:class:`Profile`. Importing this package imports NumPy only; torch and matplotlib are
imported when the measuring, network and plotting parts are first used.
"""
from .predict import predict
from .profile import Normalised, OverflowToInfWarning, Profile, Stats
from .schemes import Param, register_scheme, schemes, unregister_scheme

__version__ = "0.1.0"

_LAZY = {"measure": ("empirical", "measure"), "nets": ("nets", None),
         "compare": ("comparison", "compare"), "diagnose": ("comparison", "diagnose"),
         "input_state": ("comparison", "input_state"),
         "check": ("pipeline", "check"), "Check": ("pipeline", "Check"),
         "gaussian_inputs": ("pipeline", "gaussian_inputs"), "gate": ("gate", None),
         "plot": ("plot", None), "monitor": ("monitoring", "monitor"),
         "train": ("train", None), "data": ("data", None)}


def __getattr__(name):
    # torch and matplotlib load on first use, so `import propagation` stays fast.
    if name in _LAZY:
        import importlib
        module_name, attr = _LAZY[name]
        module = importlib.import_module(f"{__name__}.{module_name}")
        return getattr(module, attr) if attr else module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["predict", "measure", "compare", "diagnose", "check", "Check", "gaussian_inputs",
           "input_state", "monitor", "schemes", "register_scheme", "unregister_scheme", "Param", "Profile",
           "Stats", "Normalised", "OverflowToInfWarning", "nets", "plot", "train", "data", "gate"]
