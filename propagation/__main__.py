"""Command line: ``python -m propagation`` (or the ``propagation`` console script).

Examples:
  propagation schemes
  propagation predict --scheme skipinit --alpha 0.1 --depth 100 --json
  propagation measure --model propagation.nets:resnet_v2 --arg stages=3,4,6,3 --input 64,3,32,32
  propagation check --model propagation.nets:residual_mlp --arg depth=20 --arg width=256 \\
      --input 256,256 --scheme batchnorm     # exit status 1 when theory and measurement part
  propagation check --model propagation.nets:transformer --arg depth=12 --input 8,32,256 \\
      --channel-axis -1                      # a reference transformer (pre-LN)
"""
import argparse
import importlib
import json
import sys

import numpy as np

EPILOG = __doc__.split("Examples:", 1)[1]


def _value(text):
    """Parse a --arg value: ints, floats, booleans, comma lists (tuples), else the string."""
    if "," in text:
        return tuple(_value(t) for t in text.split(",") if t)
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _kv(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--arg needs key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), _value(v.strip())


def _shape(text):
    try:
        shape = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input needs comma-separated ints like 64,3,32,32, "
                                         f"got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"--input dimensions must be >= 1, got {text!r}")
    return shape


def _parser():
    p = argparse.ArgumentParser(prog="propagation", description="Predict, measure and compare "
                                "signal propagation in residual networks at initialisation.",
                                epilog="examples:" + EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("schemes", help="list the registered schemes and their parameters")

    def theory_args(sp, required_depth, default_scheme):
        sp.add_argument("--scheme", default=default_scheme,
                        help=f"scheme name (default {default_scheme or 'the model.theory scheme'})")
        sp.add_argument("--alpha", type=float, help="the scheme's alpha (skipinit, nf)")
        sp.add_argument("--depth", type=int, required=required_depth, help="number of blocks")
        sp.add_argument("--stages", type=_value, help="blocks per stage, e.g. 3,4,6,3")

    pr = sub.add_parser("predict", help="the infinite-width prediction")
    theory_args(pr, True, "batchnorm")
    pr.add_argument("--json", action="store_true", help="print the profile as JSON")

    def model_args(sp):
        sp.add_argument("--model", required=True,
                        help="module:callable building the model, e.g. propagation.nets:resnet_v2")
        sp.add_argument("--arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the model builder (repeatable)")
        sp.add_argument("--input", type=_shape, required=True, help="input shape, e.g. 64,3,32,32")
        sp.add_argument("--seeds", type=int, default=1)
        sp.add_argument("--mode", default="init", choices=("init", "train", "eval", "keep"),
                        help="init (default): norms use batch statistics, dropout and "
                             "stochastic depth are off; train: everything in train mode "
                             "(dropout on); eval: running statistics; keep: the model's flags")
        sp.add_argument("--channel-axis", type=int, default=1)
        sp.add_argument("--no-backward", action="store_true", help="forward statistics only")

    me = sub.add_parser("measure", help="measure a model on N(0, 1) inputs")
    model_args(me)
    me.add_argument("--json", action="store_true")
    me.add_argument("--plot", metavar="PNG", help="also draw the profile to this file")

    ch = sub.add_parser("check", help="measure, predict and compare; exit 1 if they part")
    model_args(ch)
    theory_args(ch, False, None)
    ch.add_argument("--width", type=int, help="channels for the finite-width band")
    ch.add_argument("--project-first", dest="project_first", default=None,
                    action=argparse.BooleanOptionalAction,
                    help="whether block 0 has a projection shortcut (default: as measured)")
    ch.add_argument("--json", action="store_true")
    return p


class BuilderError(Exception):
    """The user's model builder raised: reported as one line, exit status 2."""


def _builder(spec, kwargs):
    """The ``module:callable`` of --model with its --arg keyword arguments, as a builder
    ``() -> nn.Module``; an error raised inside the user's code becomes a BuilderError."""
    if ":" not in spec:
        raise ValueError(f"--model must look like module:callable, got {spec!r}")
    mod, name = spec.split(":", 1)
    try:
        module = importlib.import_module(mod)
    except ImportError as err:
        raise ValueError(f"--model: cannot import {mod!r}: {err}") from None
    builder = getattr(module, name, None)
    if builder is None or not callable(builder):
        raise ValueError(f"--model: {mod!r} has no callable {name!r}")

    def build():
        try:
            return builder(**kwargs)
        except Exception as err:
            raise BuilderError(f"--model {spec} raised {type(err).__name__}: {err}") from err
    return build


def _measure(args):
    import propagation
    from propagation.pipeline import build_models
    models = build_models(_builder(args.model, dict(args.arg)), args.seeds)
    m = propagation.measure(models, propagation.gaussian_inputs(args.input), seeds=args.seeds,
                            mode=args.mode, channel_axis=args.channel_axis,
                            backward=not args.no_backward)
    return models[0], m


def _print_profile(p, out):
    out.write(f"{'block':>5} {'skip q':>12} {'skip m':>12} {'branch q':>12} {'downscale':>10} "
              f"{'grad':>10}\n")
    with np.errstate(all="ignore"):
        for l in range(p.depth + 1):
            b = p.branch.second_moment[l] if l < p.depth else np.nan
            d = p.downscale[l] if l < p.depth else np.nan
            out.write(f"{l:5d} {p.skip.second_moment[l]:12.5g} {p.skip.squared_mean[l]:12.5g} "
                      f"{b:12.5g} {d:10.4g} {p.grad.second_moment[l]:10.4g}\n")


def main(argv=None):
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        import propagation
        if args.command == "schemes":
            for name, info in propagation.schemes().items():
                out.write(f"{name:13} {info}\n")
            from propagation.sequence import SEQ_SCHEMES
            out.write("\ntransformer schemes (depth = layers, two merges each; --channel-axis -1):\n")
            for name, spec in SEQ_SCHEMES.items():
                ps = ", ".join(f"{k}={p.default!r}" for k, p in spec.params.items())
                out.write(f"{name:18} {spec.description}" + (f" [{ps}]" if ps else "") + "\n")
            return 0
        params = {} if getattr(args, "alpha", None) is None else {"alpha": args.alpha}
        if args.command == "predict":
            p = propagation.predict(args.depth, args.scheme, stages=args.stages, **params)
            out.write(p.to_json() + "\n") if args.json else _print_profile(p, out)
            return 0
        if args.command == "measure":
            _, m = _measure(args)
            out.write(m.to_json() + "\n") if args.json else _print_profile(m, out)
            if args.plot:
                propagation.plot.plot_profile(measured=m).figure.savefig(args.plot)
            return 0
        overrides = dict(params)
        for key in ("scheme", "stages", "depth", "project_first"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        result = propagation.check(
            _builder(args.model, dict(args.arg)), args.input, seeds=args.seeds, width=args.width,
            mode=args.mode, channel_axis=args.channel_axis, backward=not args.no_backward,
            **overrides)
        out.write(json.dumps(result.to_dict()) + "\n" if args.json else result.table() + "\n")
        return 0 if result.ok else 1
    except BuilderError as err:
        sys.stderr.write(f"propagation {args.command}: error: {err}\n")
        return 2
    except (ValueError, TypeError, ImportError, RuntimeError, KeyError) as err:
        sys.stderr.write(f"propagation {args.command}: error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
