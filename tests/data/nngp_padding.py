"""Generate tests/data/nngp_padding.json: neural-tangents' infinite-width kernels (NNGP) of
residual ReLU conv nets on 8x8 maps, the independent reference of propagation.positions.

Not run by make or the suite (it needs JAX, which does not install beside the pinned CPU
torch): run once, in its own environment, and commit its output with the versions recorded
in it. The environment that made the stored file:

    python -m venv /tmp/jaxenv
    /tmp/jaxenv/bin/pip install neural-tangents==0.6.5 jax==0.4.30 jaxlib==0.4.30 tf2jax==0.3.6
    /tmp/jaxenv/bin/python tests/data/nngp_padding.py

Networks (neural-tangents' stax, "ntk" parameterisation, no biases; Conv weights of variance
W_std^2 / fan_in): a linear 3x3 stem to the stream, then six pre-activation residual blocks
x + Conv(ReLU(Conv(ReLU(x)))) with He weights (W_std^2 = 2), 3x3, stride 1:
  - "same": zero padding ('SAME': one pixel each side at stride 1, as PyTorch's padding=1);
  - "circular": circular padding;
  - "pooled": zero padding, and a 2x2 average pool (stride 2) on the stream after block 3,
    so blocks 4-6 run on 4x4 maps.
The input is three 8x8x3 N(0, 1) images (stored). For each network and block, the stream's
kernel over (example, position) pairs gives the second moment q = mean over examples and
positions of K[n, p, n, p], the squared channel mean over the batch and positions
m = mean of all K[n, p, n', p'], and the per-position q.
"""
import json
import os
import platform
import sys
import warnings

import numpy as np

warnings.filterwarnings("ignore", message=".*FanIn.*")  # identity + conv branch: independent


def main():
    import jax
    jax.config.update("jax_enable_x64", True)
    import neural_tangents as nt
    from neural_tangents import stax

    def block(channels, padding):
        branch = stax.serial(stax.Relu(), stax.Conv(channels, (3, 3), padding=padding,
                                                    W_std=2 ** 0.5),
                             stax.Relu(), stax.Conv(channels, (3, 3), padding=padding,
                                                    W_std=2 ** 0.5))
        return stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), branch),
                           stax.FanInSum())

    rng = np.random.default_rng(2026)
    x = rng.normal(size=(3, 8, 8, 3))
    out = {"generator": "tests/data/nngp_padding.py",
           "versions": {"neural_tangents": nt.__version__, "jax": jax.__version__,
                        "numpy": np.__version__, "python": platform.python_version()},
           "input_nhwc": x.tolist(), "blocks": 6, "channels": 16, "networks": {}}
    for name, padding, pool_after in (("same", "SAME", None), ("circular", "CIRCULAR", None),
                                      ("pooled", "SAME", 3)):
        layers = [stax.Conv(16, (3, 3), padding=padding, W_std=1.0)]
        rows = []
        for b in range(6):
            layers.append(block(16, padding))
            if pool_after is not None and b + 1 == pool_after:
                layers.append(stax.AvgPool((2, 2), strides=(2, 2), padding="VALID"))
            _, _, kernel_fn = stax.serial(*layers)
            # neural-tangents' layout interleaves the two sides per axis, (N, N', H, H', W, W'),
            # with the spatial axes in reverse order where the Kernel says is_reversed.
            kernel = kernel_fn(x, None)
            k = np.asarray(kernel.nngp)
            if kernel.is_reversed:
                k = k.transpose(0, 1, 4, 5, 2, 3)
            n, _, h, _, w, _ = k.shape
            flat = k.transpose(0, 2, 4, 1, 3, 5).reshape(n * h * w, n * h * w)
            diag = np.diag(flat).reshape(n, h, w)
            rows.append({"block": b + 1, "q": float(diag.mean()), "m": float(flat.mean()),
                         "q_per_position": diag.mean(axis=0).tolist()})
            print(name, b + 1, rows[-1]["q"], rows[-1]["m"], flush=True)
        out["networks"][name] = {"padding": padding, "pool_after": pool_after, "rows": rows}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nngp_padding.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
