"""Print every derivation: ``python -m derivations [--layers 3]``."""
import argparse
import time

from . import attention, closed_forms, finite_width, kernels

_HEADER = """Signal propagation at initialisation, derived with sympy.
Notation: l = block index, D = depth, q0 / m0 = second moment / squared mean of the input x_0,
c = 1 - 1/pi = 2 Var[relu(z)], alpha = branch multiplier. Gradients are relative to the last
merge output (predict's grad[-1] = 1)."""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m derivations", description=__doc__)
    parser.add_argument("--layers", type=int, default=2, help="weight layers per residual branch")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(_HEADER)
    sections = [("Gaussian kernels of the ReLU", kernels.derivations()),
                (f"Closed forms ({args.layers} weight layers per branch)",
                 closed_forms.derivations(args.layers)),
                ("Where THEORY.md differs from the derivation", closed_forms.theory_notes()),
                ("Finite width: one channel's moments", finite_width.derivations()),
                ("Attention at initialisation", attention.derivations())]
    for title, records in sections:
        print(f"\n== {title} ==")
        scheme = None
        for record in records:
            head = record.name.split(":")[0] if ":" in record.name else None
            if head != scheme and head in closed_forms.blocks.SCHEMES and title.startswith("Closed"):
                print(f"\n-- {head} --")
            scheme = head
            print(record)
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
