"""Closed forms of every scheme's profile, solved with sympy from the block maps of blocks.py.

For each scheme the block recursion x_{l+1} = post(x_l + branch(pre(x_l))) is composed
symbolically, then:

- the skip second moment q_l solves a first-order recurrence (``rsolve``, checked by
  substituting the solution back); the squared mean m_l likewise when the branch's mean
  does not depend on m_l, or is 0 for all l when m_l = 0 is a fixed point (NF: Scaled WS maps
  rho = 0 to 0), and otherwise has no closed form (kappa iterated);
- the gradient G_l, with G = 1 at the last merge output, is the product over k = l..D-1 of
  (1 + chi_k), chi_k the branch's backward gain, times the backward gains p_k of any
  post-merge layer for k = l..D-2. When the factors are rational in k the product is a ratio
  of gamma functions, Gamma(D + a)/Gamma(l + a) per root a; it is checked by G_l / G_{l+1}.

Each closed form is exposed as a NumPy-vectorised callable (``sympy.lambdify``), e.g.
``skip_second_moment("nf", np.arange(1001), q0=2.0, alpha=0.2)``. Block indices follow
``propagation.predict``: ``l = 0..D`` for the skip path (x_l, the input of block l, and x_D
the output), ``l = 0..D-1`` for branches, downscale and the gradient at x_l.
"""
import functools
from dataclasses import dataclass, field

import mpmath
import numpy as np
import sympy as sp

from . import blocks, kernels
from ._record import Derivation
from .blocks import alpha, gain2, l

k = sp.Symbol("k", integer=True, nonnegative=True)   # running block index in sums/products
D = sp.Symbol("D", integer=True, positive=True)      # depth (number of blocks)
q0 = sp.Symbol("q0", positive=True)                  # input_second_moment
m0 = sp.Symbol("m0", nonnegative=True)               # input_squared_mean
c = sp.Symbol("c", positive=True)                    # 1 - 1/pi = 2 Var[relu(z)]
_X = sp.Symbol("X", positive=True)                   # q_l inside a recursion
_M = sp.Symbol("M", nonnegative=True)                # m_l inside a recursion

_SYMBOL = {"m0": m0, "q0": q0}

#: The argument order of every lambdified closed form.
ARGS = (l, D, q0, m0, alpha, gain2)

#: quantity -> (notation, what it is).
QUANTITIES = {
    "skip.second_moment": ("q_l", "second moment of x_l, the input of block l"),
    "skip.squared_mean": ("m_l", "average channel squared mean of x_l"),
    "skip.variance": ("v_l", "average channel variance of x_l"),
    "branch.second_moment": ("q^b_l", "second moment of the residual branch of block l"),
    "branch.squared_mean": ("m^b_l", "average channel squared mean of the branch of block l"),
    "merge.second_moment": ("q^y_l", "second moment of x_l + f_l(x_l), before any post-merge layer"),
    "downscale": ("d_l", "sqrt(q_l / q^b_l): how much the branch of block l is downscaled"),
    "backward_gain": ("chi_l", "the branch's backward gain: G(x_l) = (1 + chi_l) G(merge output)"),
    "grad.second_moment": ("G_l", "gradient second moment at x_l relative to the last merge output"),
}


@dataclass(frozen=True)
class Form:
    """One closed form: ``expr`` in the symbols ARGS, valid when ``assumptions`` hold."""

    scheme: str
    quantity: str
    expr: sp.Expr
    how: str
    assumptions: dict = field(default_factory=dict)

    def derivation(self):
        note, meaning = QUANTITIES[self.quantity]
        cond = "".join(f", {s} = {v}" for s, v in self.assumptions.items())
        return Derivation(f"{self.scheme}: {note}", self.expr, f"{meaning} ({self.how}{cond})")


class NoClosedForm(NotImplementedError):
    """The quantity has no closed form for this scheme (or not under the given inputs)."""


# --- solving the recursions ----------------------------------------------------------------

def _in_c(expr):
    """Write pi as 1/(1 - c), c = 1 - 1/pi: the backward gains become rational in c, which keeps
    the gamma functions of the products short and their checks fast."""
    return sp.factor(sp.cancel(expr.subs(sp.pi, 1 / (1 - c)))) if expr.has(sp.pi) else expr


def _check_zero(expr, what):
    if sp.cancel(expr) != 0 and sp.simplify(expr) != 0:
        raise AssertionError(f"closed form fails its own check: {what}")


def _solve_first_order(F, Y, x0, name):
    """x_{l+1} = F(x_l, l), x_0 = x0, with F written in the symbol ``Y`` for x_l.

    Returns (solution, how it was found), or (None, None) when F is not affine in Y (kappa
    iterated: no closed form is sought). A solution is checked by substituting it back.
    """
    recurrence = f"{name}_(l+1) = " + sp.sstr(F).replace(str(Y), f"{name}_l")
    if not F.has(Y):
        # The block resets its input (post-norm): x_l is x0 at l = 0 and F afterwards.
        sol, how = sp.Piecewise((x0, sp.Eq(l, 0)), (F.subs(l, l - 1), True)), f"reset: {recurrence}"
    else:
        a = sp.diff(F, Y)
        if a.has(Y):
            return None, None
        x = sp.Function(name)
        sol = sp.rsolve(x(l + 1) - a * x(l) - sp.simplify(F - a * Y), x(l), {x(0): x0})
        if sol is None:
            return None, None
        sol, how = sp.simplify(sol), f"rsolve of {recurrence}"
    _check_zero(sol.subs(l, l + 1) - F.subs(Y, sol), f"{name}_(l+1) = F({name}_l)")
    _check_zero(sol.subs(l, 0) - x0, f"{name}_0 = {x0}")
    return sol, how


def _product_rational(f, lo, hi):
    """prod_{k=lo}^{hi} f(k) for f rational in k, as gamma functions (Karr's convention, so
    an empty product, hi = lo - 1, is 1): a factor (k - r) contributes Gamma(hi+1-r)/Gamma(lo-r).
    """
    num, den = sp.fraction(sp.cancel(sp.together(f)))
    pn, pd = sp.Poly(num, k), sp.Poly(den, k)
    out = (pn.LC() / pd.LC()) ** (hi - lo + 1)
    for poly, sign in ((pn, 1), (pd, -1)):
        roots = sp.roots(poly, k)
        if sum(roots.values()) != poly.degree():
            raise NoClosedForm(f"cannot factor {poly.as_expr()} over k")
        for r, mult in roots.items():
            out *= (sp.gamma(hi + 1 - r) / sp.gamma(lo - r)) ** (sign * mult)
    return out


def _generic(expr):
    """``expr`` with every Piecewise replaced by its last (general-l) branch."""
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), lambda e: e.args[-1].expr)


def _first_and_rest(f):
    """(f at k = 0, f for k >= 1) for a factor that is Piecewise in k == 0 (post-norm)."""
    if not f.has(sp.Piecewise):
        return None, f
    return f.subs(k, 0), _generic(f)


def _product(f, lo, hi):
    """prod_{k=lo}^{hi} f(k), allowing a different first factor f(0)."""
    first, rest = _first_and_rest(f)
    if not rest.is_rational_function(k):
        raise NoClosedForm(f"the factor {rest} is not rational in k")
    general = _product_rational(rest, lo, hi)
    if first is None or sp.simplify(first - rest.subs(k, 0)) == 0:
        return general
    return sp.Piecewise((first * _product_rational(rest, 1, hi), sp.Eq(lo, 0) & (hi >= 0)),
                        (general, True))


# --- the closed forms of one scheme -----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def derive(scheme, layers=2):
    """Every closed form of ``scheme`` with ``layers`` weight layers per branch.

    Returns: ``{quantity: Form}``; quantities without a closed form are absent.
    """
    if scheme not in blocks.SCHEMES:
        raise NoClosedForm(f"no derivation for scheme {scheme!r}; derived: "
                           f"{', '.join(blocks.SCHEMES)}")
    _, build = blocks.SCHEMES[scheme]
    block = build(layers)
    forms = {}

    def add(quantity, expr, how, **assume):
        forms[quantity] = Form(scheme, quantity, expr, how,
                               {_SYMBOL[n]: v for n, v in assume.items()})

    qp, mp = blocks.run(block.pre, _X, _M, l)
    qb, mb = blocks.run(block.branch, qp, mp, l)
    qy, my = _X + qb, _M + mb
    qn, mn = blocks.run(block.post, qy, my, l)
    if qn.has(_M) or qb.has(_M):
        raise AssertionError(f"{scheme}: a second moment depends on the squared mean")

    q_l, how = _solve_first_order(sp.simplify(qn), _X, q0, "q")
    add("skip.second_moment", q_l, how)
    add("branch.second_moment", sp.simplify(qb.subs(_X, q_l)), "the branch maps at q_l")
    add("merge.second_moment", sp.simplify(qy.subs(_X, q_l)), "q_l + q^b_l")
    qb_l = forms["branch.second_moment"].expr
    add("downscale", sp.oo if qb_l == 0 else sp.simplify(sp.sqrt(q_l / qb_l)), "the two forms above")

    F_m = mn.subs(_X, q_l)
    m_l, how = _solve_first_order(F_m, _M, m0, "m")
    m_assume = {}
    if m_l is not None:
        add("skip.squared_mean", m_l, how)
    elif sp.simplify(F_m.subs(_M, 0)) == 0:
        m_l, m_assume = sp.S(0), {"m0": 0}
        add("skip.squared_mean", m_l, "m = 0 is a fixed point of the block", m0=0)
    if m_l is not None:
        add("skip.variance", _in_c(sp.simplify(q_l - m_l)), "q_l - m_l", **m_assume)
        add("branch.squared_mean", sp.simplify(mb.subs({_X: q_l, _M: m_l})),
            "the branch maps at (q_l, m_l)", **m_assume)

    chi = blocks.backward_gain(block.pre + block.branch, _X, _M, l)
    post = blocks.backward_gain(block.post, qy, my, l)
    chi_assume = {}
    if chi.has(_M) or post.has(_M):
        if m_l is None:
            return forms
        chi, post, chi_assume = chi.subs(_M, m_l), post.subs(_M, m_l), dict(m_assume)
    chi, post = chi.subs(_X, q_l), post.subs(_X, q_l)
    if not _generic(1 + chi).subs(l, k).is_rational_function(k):
        # relu_bn_conv: BN divides by the variance of relu(x_l), (q_l/2)(1 - kappa(m0/q_l)),
        # which is rational in l only when kappa's argument is 0.
        chi, post, chi_assume = chi.subs(m0, 0), post.subs(m0, 0), {"m0": 0}
    chi, post = _in_c(sp.simplify(chi)), _in_c(sp.simplify(post))
    add("backward_gain", chi, "product of the branch's layer gains at their inputs", **chi_assume)
    G = _product((1 + chi).subs(l, k), l, D - 1) * _product(post.subs(l, k), l, D - 2)
    telescoped = sp.gammasimp(G)
    # Keep the plain gamma ratio unless roots an integer apart cancel it to a rational form.
    G = sp.simplify(sp.piecewise_fold(telescoped)) if not telescoped.has(sp.gamma) else G
    generic = _generic(G)
    ratio = sp.gammasimp(generic / generic.subs(l, l + 1))
    _check_zero(ratio - (1 + _generic(chi)) * _generic(post), "G_l / G_(l+1) = (1 + chi_l) p_l")
    add("grad.second_moment", G, "prod_(k=l)^(D-1) (1 + chi_k) times post-merge gains", **chi_assume)
    return forms


@functools.lru_cache(maxsize=None)
def backward_reads_state(scheme, layers=2):
    """True when the backward gains (branch or post-merge) depend on the forward state (q_l, m_l)
    of the block, as normalisation layers' do; False when they are fixed numbers per block."""
    _, build = blocks.SCHEMES[scheme]
    block = build(layers)
    qb, mb = blocks.run(block.branch, *blocks.run(block.pre, _X, _M, l), l)
    gains = (blocks.backward_gain(block.pre + block.branch, _X, _M, l)
             * blocks.backward_gain(block.post, _X + qb, _M + mb, l))
    return bool(gains.has(_X) or gains.has(_M))


def all_forms(layers=2):
    """``{scheme: {quantity: Form}}`` for every derived scheme."""
    return {name: derive(name, layers) for name in blocks.SCHEMES}


@functools.lru_cache(maxsize=None)
def power_law(scheme, layers=2):
    """Exponent b of G_l ~ (D/l)^b for 1 << l < D, or None when G is not a power law.

    chi_k ~ b/k for large k makes prod (1 + chi_k) a ratio Gamma(D + a + b) Gamma(l + a) /
    (Gamma(D + a) Gamma(l + a + b)); Stirling gives Gamma(x + a + b)/Gamma(x + a) =
    x^b (1 + O(1/x)) (checked by ``stirling_ratio``), hence (D/l)^b.
    """
    chi = derive(scheme, layers).get("backward_gain")
    if chi is None:
        return None
    b = sp.limit(k * chi.expr.subs(l, k), k, sp.oo)
    return sp.simplify(b) if b.is_finite and b != 0 else None


@functools.lru_cache(maxsize=None)
def stirling_ratio():
    """log(Gamma(x + a + b) / Gamma(x + a)) - b log x = O(1/x): the series at x = 1/t."""
    a, b, t = sp.symbols("a b t", positive=True)
    expr = (sp.loggamma(1 / t + a + b) - sp.loggamma(1 / t + a) + b * sp.log(t))
    ser = sp.series(expr, t, 0, 2).removeO()
    const = sp.simplify(ser.subs(t, 0))
    _check_zero(const, "the constant term of the Stirling expansion vanishes")
    return sp.simplify(ser)


# --- NumPy callables --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _compiled(scheme, quantity, layers, exact):
    form = derive(scheme, layers).get(quantity)
    if form is None:
        raise NoClosedForm(f"{QUANTITIES[quantity][0]} ({quantity}) of scheme {scheme!r} has no "
                           f"closed form (its recursion iterates kappa); use propagation.predict")
    expr = form.expr.subs(c, kernels.C)
    if exact or expr.has(sp.gamma):
        # Gamma(D + a) overflows float64 from D ~ 170, so these go through mpmath, which also
        # makes them exact to the float64 result.
        f = sp.lambdify(ARGS, expr, "mpmath")

        def call(*a):
            with mpmath.workdps(40):
                try:
                    return float(f(*(mpmath.mpf(float(x)) for x in a)))
                except ZeroDivisionError:
                    # 1/alpha at alpha = 0: the limit from alpha > 0 (every form is positive).
                    return np.inf
        return form, np.vectorize(call, otypes=[np.float64])
    f = sp.lambdify(ARGS, expr, "numpy")
    return form, lambda *a: f(*(np.asarray(x, dtype=np.float64) for x in a))


def evaluate(scheme, quantity, l, depth=None, *, q0=1.0, m0=0.0, layers=2, exact=False, **params):
    """Evaluate a closed form on arrays.

    Args:
        scheme: a scheme of ``blocks.SCHEMES``.
        quantity: a key of ``QUANTITIES``.
        l: block indices (int or array).
        depth: D, needed by ``grad.second_moment`` only.
        q0, m0: input_second_moment and input_squared_mean of ``predict``.
        layers: weight layers per branch (2 or 3).
        exact: evaluate in mpmath at 40 digits (the result is the correctly rounded float64).
        **params: the scheme's parameters (``alpha``, ``gain2``), all of them: there are no
            defaults here, so a closed form never silently uses another value than predict.
    Returns: float64 array of the broadcast shape of the inputs.
    Raises: NoClosedForm when there is none, or when its assumptions (m0 = 0) do not hold.
    """
    names, _ = blocks.SCHEMES.get(scheme, ({}, None))
    if set(params) != set(names):
        raise TypeError(f"scheme {scheme!r} takes the parameter(s) {sorted(names) or 'none'}, "
                        f"all required; got {sorted(params) or 'none'}")
    form, f = _compiled(scheme, quantity, layers, exact)
    values = {"q0": q0, "m0": m0}
    for sym, required in form.assumptions.items():
        if values[str(sym)] != required:
            raise NoClosedForm(f"the closed form of {quantity} for {scheme!r} needs "
                               f"{sym} = {required}, got {values[str(sym)]}")
    if depth is None and D in form.expr.free_symbols:
        raise TypeError(f"{quantity} of {scheme!r} depends on the depth: pass depth=")
    args = [l, 0 if depth is None else depth, q0, m0,
            params.get("alpha", 0.0), params.get("gain2", 0.0)]
    shape = np.broadcast_shapes(*(np.shape(a) for a in args))
    return np.broadcast_to(np.asarray(f(*args), dtype=np.float64), shape).copy()


def skip_second_moment(scheme, l, **kw):
    """q_l, the second moment of x_l (l = 0..D); see :func:`evaluate` for the arguments."""
    return evaluate(scheme, "skip.second_moment", l, **kw)


def skip_squared_mean(scheme, l, **kw):
    """m_l, the average channel squared mean of x_l."""
    return evaluate(scheme, "skip.squared_mean", l, **kw)


def skip_variance(scheme, l, **kw):
    """v_l = q_l - m_l, the average channel variance of x_l."""
    return evaluate(scheme, "skip.variance", l, **kw)


def branch_second_moment(scheme, l, **kw):
    """Second moment of the residual branch of block l (l = 0..D-1)."""
    return evaluate(scheme, "branch.second_moment", l, **kw)


def branch_squared_mean(scheme, l, **kw):
    """Average channel squared mean of the residual branch of block l."""
    return evaluate(scheme, "branch.squared_mean", l, **kw)


def merge_second_moment(scheme, l, **kw):
    """Second moment of x_l + f_l(x_l) (``predict``'s last skip entry is the one at l = D-1)."""
    return evaluate(scheme, "merge.second_moment", l, **kw)


def downscale(scheme, l, **kw):
    """sqrt(q_l / q^b_l), the downscaling factor of block l."""
    return evaluate(scheme, "downscale", l, **kw)


def grad_second_moment(scheme, l, depth, **kw):
    """G_l for l = 0..D-1 in a network of ``depth`` blocks, with G = 1 at the last merge output."""
    return evaluate(scheme, "grad.second_moment", l, depth, **kw)


# --- what `python -m derivations` prints ---------------------------------------------------------

def derivations(layers=2):
    """Every closed form, as :class:`Derivation` records, scheme by scheme."""
    out = [Derivation("beta_l^2 (nf)", blocks.nf_expected_variance(),
                      "NF's expected variance: rsolve of beta_(l+1)^2 = beta_l^2 + alpha^2, "
                      "beta_0 = 1")]
    for name in blocks.SCHEMES:
        out += [f.derivation() for f in derive(name, layers).values()]
        b = power_law(name, layers)
        if b is not None:
            out.append(Derivation(f"{name}: G_l ~ (D/l)^b, b", b,
                                  f"= {float(b.subs(c, kernels.C)):.4f}: limit of k chi_k; "
                                  "Stirling on the gamma ratio"))
    out.append(Derivation("log Gamma(x+a+b) - log Gamma(x+a) - b log x", stirling_ratio(),
                          "Stirling at x = 1/t: no constant term, so Gamma(x+a+b)/Gamma(x+a) ~ x^b"))
    return out


def theory_notes():
    """Where THEORY.md's statements differ from the derivation, each with the derived value."""
    nf_q = derive("nf")["skip.second_moment"].expr
    bn_g0 = derive("batchnorm")["grad.second_moment"].expr.subs({l: 0, D: 20, q0: 1, m0: 0,
                                                                  c: kernels.C})
    rho_half = kernels.scaled_ws_correlation().subs(kernels.rho, sp.Rational(1, 2))
    return [
        Derivation("nf: q_l - (q0 + alpha^2 l)", sp.factor(nf_q - (q0 + alpha ** 2 * l)),
                   "THEORY's nf law q_l = q0 + alpha^2 l holds only for q0 = 1: beta_l^2 is fixed "
                   "at 1 + alpha^2 l, so q_l = q0 (1 + alpha^2 l) and the downscale is "
                   "sqrt(q_l / q0) / alpha"),
        Derivation("sqrt_half: G_l (l < D)", derive("sqrt_half")["grad.second_moment"].expr,
                   "relative to the last merge output x_(D-1) + f, which predict normalises to 1; "
                   "relative to x_D = (x + f)/sqrt(2) it is 1 (THEORY: 'about 1'); predict's last "
                   "skip entry is that merge sum, 2 q0"),
        Derivation("batchnorm: G_0 at D = 20", sp.N(bn_g0, 6),
                   "THEORY.md quotes 'predicted G_0 = 180'"),
        Derivation("Scaled WS: rho' at rho = 1/2", sp.N(rho_half, 6),
                   "THEORY's table says ReLU + Scaled WS gives (q, about 0); that holds at rho = 0"),
        Derivation("layernorm: G_l", derive("layernorm")["grad.second_moment"].expr,
                   "THEORY gives no layernorm gradient; chi_l = 1/q_l telescopes, for every q0"),
        Derivation("postnorm: q_l", derive("postnorm")["skip.second_moment"].expr,
                   "THEORY says q_l = 1: true from block 1 on; the gradient at x_0 is then 2/q0 "
                   "(D >= 2)"),
    ]
