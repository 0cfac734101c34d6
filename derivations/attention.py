"""Attention at initialisation (propagation/sequence.py), derived.

The theory expands the softmax to second order in the logits around the uniform (or prefix)
average P. For exchangeable tokens, K = k + (q - k) I, the expansion's sums are carried out
here symbolically for T = 2..6 with explicit index sums (no matrix shortcut), and the closed
form in T is read off and checked at every T; so are the entropy of the attention row (the
issue's ln T - s^2 / 2), the causal prefix mean at zero logits, and post-LN's collapse map.
"""
import sympy as sp

from ._record import Derivation

q, k, g, r = sp.symbols("q k g r", positive=True)
T = sp.Symbol("T", positive=True, integer=True)


def _average(n, causal):
    if causal:
        return sp.Matrix(n, n, lambda i, j: sp.Rational(1, i + 1) if j <= i else 0)
    return sp.ones(n, n) / n


def second_order_output(n, K, causal=False):
    """E[(A K A^T)] to first order in g, as explicit sums over t, s, u, v (sequence.py's
    formulas, written out index by index)."""
    P = _average(n, causal)
    PK = P * K
    PKP = PK * P.T
    D = sp.Matrix(n, n, lambda t, s: g * K[t, t] * (K[s, s] - 2 * PK[t, s] + PKP[t, t]))
    H = sp.Matrix(n, n, lambda t, s: (D[t, s] - sum(P[t, v] * D[t, v] for v in range(n))) / 2)

    def M(t, s, u, v):
        return K[s, v] - PK[u, s] - PK[t, v] + PKP[t, u]
    out = sp.zeros(n, n)
    for t in range(n):
        for u in range(n):
            out[t, u] = sp.expand(sum(P[t, s] * P[u, v] * K[s, v]
                                      * (1 + g * K[t, u] * M(t, s, u, v) + H[t, s] + H[u, v])
                                      for s in range(n) for v in range(n)))
    return out


def exchangeable(ns=range(2, 7)):
    """K'_tt and K'_tu for exchangeable tokens and uniform attention, closed in T."""
    diag = k + (q - k) / T + g * q * (q - k) ** 2 * (T - 1) / T ** 2
    off = k + (q - k) / T + g * k * (q - k) ** 2 * (T - 1) / T ** 2
    for n in ns:
        K = k * sp.ones(n, n) + (q - k) * sp.eye(n)
        out = second_order_output(n, K)
        assert sp.simplify(out[0, 0] - diag.subs(T, n)) == 0, n
        assert sp.simplify(out[0, 1] - off.subs(T, n)) == 0, n
    return [Derivation("attention K'_tt", diag,
                       "uniform attention over exchangeable tokens (q on the diagonal, k off it), "
                       "to first order in the logit variance g; from the index sums at T = 2..6"),
            Derivation("attention K'_tu", off,
                       "two different tokens: every token gets the same mean, and the logits' "
                       "spread adds g k (q - k)^2 (T - 1) / T^2")]


def entropy():
    """The entropy of a softmax row of T i.i.d. N(0, s^2) logits, to order s^2 at large T:
    with A_s = e^(l_s) / sum e^l ~ e^(l_s - s^2/2) / T, -sum A ln A = ln T - s^2 / 2."""
    s = sp.Symbol("s", positive=True)
    l = sp.Symbol("l", real=True)
    density = sp.exp(-l ** 2 / (2 * s ** 2)) / sp.sqrt(2 * sp.pi * s ** 2)
    a = sp.exp(l - s ** 2 / 2) / T  # the large-T weight of logit l (the partition function
    #                                  concentrates at T e^(s^2/2))
    H = sp.simplify(T * sp.integrate(-a * sp.log(a) * density, (l, -sp.oo, sp.oo)))
    assert sp.simplify(H - (sp.log(T) - s ** 2 / 2)) == 0
    return Derivation("attention entropy", H,
                      "T i.i.d. N(0, s^2) logits at large T: the uniform ln T less s^2 / 2")


def causal_prefix(ns=range(2, 7)):
    """At g = 0 a causal row is the prefix mean: independent unit tokens give a second moment
    averaged over tokens of H_T / T (H_T the harmonic number)."""
    for n in ns:
        out = second_order_output(n, sp.eye(n), causal=True).subs(g, 0)
        assert sp.simplify(sum(out[t, t] for t in range(n)) / n - sp.harmonic(n) / n) == 0
    return Derivation("causal attention q'", sp.harmonic(T) / T,
                      "zero logits, a causal mask, independent unit tokens: token t averages "
                      "t + 1 tokens (q / (t + 1)); the mean over tokens, checked at T = 2..6")


def postln_collapse():
    """Post-LN with uniform attention: the normalised stream's token correlation r maps to
    r' = (2 r + (1 - r)/T) / (1 + r + (1 - r)/T) per attention merge; 1 - r' = (1 - r)
    / (1 + r + (1 - r)/T), which halves as r -> 1 (geometric rank collapse)."""
    a = r + (1 - r) / T  # the branch: every token the mean, second moment r + (1 - r)/T
    r_next = (r + a) / (1 + a)
    one_minus = sp.factor(sp.simplify(1 - r_next))
    assert sp.simplify(one_minus - (1 - r) / (1 + r + (1 - r) / T)) == 0
    rate = sp.limit(one_minus / (1 - r), r, 1)
    assert rate == sp.Rational(1, 2)
    return [Derivation("post-LN r'", sp.simplify(r_next),
                       "token correlation after one post-LN attention merge, uniform attention"),
            Derivation("post-LN (1 - r') / (1 - r) as r -> 1", rate,
                       "1 - r halves per attention merge once the tokens are close")]


def derivations():
    return exchangeable() + [entropy(), causal_prefix()] + postln_collapse()
