"""The one-channel moments behind the finite-width theory (propagation/finite.py), derived.

Given the common factor g, the b values of a channel are i.i.d.; the covariance of the
statistics Y_f = mean_i f_i^2 and Z_f = (mean_i f_i)^2 then follows from the element
moments by counting index patterns. These derivations expand the sums over index tuples for
b = 2..6 with symbolic element moments and compare them with the closed counts that
``propagation.finite`` evaluates (``counted``), so the counts cannot drift. They also derive
the truncated Gaussian moments E[relu(X)^k] for X ~ N(mu, s^2), k = 1..4, and the Gaussian
(Wishart) covariance of (Y, Z) for an exchangeable covariance.
"""
import itertools

import sympy as sp

from ._record import Derivation


def _element_moment(indices, f, h):
    """E[prod f_i^a h_i^c | g] for an index assignment: a product over distinct indices of
    mixed moments M(a, c) = E[f^a h^c]."""
    counts = {}
    for idx, which in indices:
        a, c = counts.get(idx, (0, 0))
        counts[idx] = (a + 1, c) if which == "f" else (a, c + 1)
    out = sp.Integer(1)
    for a, c in counts.values():
        out *= sp.Symbol(f"M{a}{c}")
    return out


def expanded(b):
    """E[Y_f Y_h], E[Y_f Z_h], E[Z_f Z_h] by brute-force expansion over index tuples."""
    rng = range(b)
    yy = sum(_element_moment(((i, "f"), (i, "f"), (j, "h"), (j, "h")), "f", "h")
             for i in rng for j in rng) / b ** 2
    yz = sum(_element_moment(((i, "f"), (i, "f"), (j, "h"), (k, "h")), "f", "h")
             for i in rng for j in rng for k in rng) / b ** 3
    zz = sum(_element_moment(((i, "f"), (j, "f"), (k, "h"), (l, "h")), "f", "h")
             for i, j, k, l in itertools.product(rng, repeat=4)) / b ** 4
    return sp.expand(yy), sp.expand(yz), sp.expand(zz)


def counted(b):
    """The same expectations as propagation.finite counts them (by partition pattern)."""
    M = {k: sp.Symbol(f"M{k}") for k in ("20", "02", "10", "01", "22", "21", "12", "11")}
    c1, c2 = b, b * (b - 1)
    c3, c4 = c2 * (b - 2), c2 * (b - 2) * (b - 3)
    f1, f2, h1, h2 = M["10"], M["20"], M["01"], M["02"]
    f2h2, f2h1, f1h2, f1h1 = M["22"], M["21"], M["12"], M["11"]
    yy = (c1 * f2h2 + c2 * f2 * h2) / sp.Integer(b) ** 2
    yz = (c1 * f2h2 + c2 * f2 * h2 + 2 * c2 * f2h1 * h1 + c3 * f2 * h1 ** 2) / sp.Integer(b) ** 3
    zz = (c1 * f2h2 + c2 * f2 * h2 + 2 * c2 * f1h1 ** 2 + 2 * c2 * (f2h1 * h1 + f1h2 * f1)
          + c3 * (f2 * h1 ** 2 + h2 * f1 ** 2 + 4 * f1h1 * f1 * h1)
          + c4 * f1 ** 2 * h1 ** 2) / sp.Integer(b) ** 4
    return sp.expand(yy), sp.expand(yz), sp.expand(zz)


def pattern_counts(bs=range(2, 7)):
    """The counts agree with the expansion for every b in ``bs`` (exact polynomials)."""
    for b in bs:
        for e, c, name in zip(expanded(b), counted(b), ("E[Y Y]", "E[Y Z]", "E[Z Z]")):
            if sp.simplify(e - c) != 0:
                raise AssertionError(f"{name} at b={b}: expansion and count differ by {e - c}")
    return Derivation("pattern counts", sp.Symbol("ok"),
                      f"E[Y_f Y_h], E[Y_f Z_h], E[Z_f Z_h] by index patterns = brute-force "
                      f"expansion, b = {min(bs)}..{max(bs)}")


def relu_truncated_moments():
    """E[relu(X)^k] for X ~ N(mu, s^2), in terms of t = mu / s, Phi(t) and phi(t)."""
    mu = sp.Symbol("mu", real=True)
    s = sp.Symbol("s", positive=True)
    t = mu / s
    Phi = (1 + sp.erf(t / sp.sqrt(2))) / 2
    phi = sp.exp(-t ** 2 / 2) / sp.sqrt(2 * sp.pi)
    claimed = {1: mu * Phi + s * phi,
               2: (mu ** 2 + s ** 2) * Phi + mu * s * phi,
               3: (mu ** 3 + 3 * mu * s ** 2) * Phi + (mu ** 2 + 2 * s ** 2) * s * phi,
               4: (mu ** 4 + 6 * mu ** 2 * s ** 2 + 3 * s ** 4) * Phi + (mu ** 3 + 5 * mu * s ** 2) * s * phi}
    out = []
    import mpmath
    mpmath.mp.dps = 40
    for k, expr in claimed.items():
        f = sp.lambdify((mu, s), expr, "mpmath")
        # Against direct integration of x^k over the positive half-line, at three points.
        for mv, sv in (("-1.5", "1"), ("0", "2"), ("0.7", "0.333")):
            m_, s_ = mpmath.mpf(mv), mpmath.mpf(sv)
            exact = mpmath.quad(lambda v: v ** k * mpmath.npdf(v, m_, s_), [0, m_ + 20 * s_]) \
                if m_ + 20 * s_ > 0 else mpmath.mpf(0)
            if abs(exact - f(m_, s_)) > mpmath.mpf(10) ** -25:
                raise AssertionError(f"E[relu(X)^{k}] at mu={mv}, s={sv}: off by {exact - f(m_, s_)}")
        out.append(Derivation(f"E[relu(X)^{k}]", expr,
                              "X ~ N(mu, s^2); checked against 40-digit quadrature at three points"))
    return out


def wishart_covariance():
    """Cov of (Y, Z) for z ~ N(0, K), K = (1 - rho) I + rho J over b inputs, b symbolic."""
    b, rho = sp.symbols("b rho", positive=True)
    # tr(K^2), 1'K1 and 1'K^2 1 for the exchangeable K, from its two eigenvalues:
    # 1 - rho (multiplicity b - 1) and 1 - rho + b rho (on the all-ones vector).
    lam0, lam1 = 1 - rho, 1 - rho + b * rho
    trK2 = (b - 1) * lam0 ** 2 + lam1 ** 2
    one_K_one, one_K2_one = b * lam1, b * lam1 ** 2
    m = one_K_one / b ** 2
    var_y = sp.simplify(2 * trK2 / b ** 2)
    var_z = sp.simplify(2 * one_K_one ** 2 / b ** 4)
    cov_yz = sp.simplify(2 * one_K2_one / b ** 3)
    claim_y = 2 / b * (1 + (b - 1) * rho ** 2)
    if sp.simplify(var_y - claim_y) != 0 or sp.simplify(var_z - 2 * m ** 2) != 0 \
            or sp.simplify(cov_yz - 2 * m ** 2) != 0:
        raise AssertionError("the Wishart covariance of (Y, Z) differs from finite._wishart")
    return [Derivation("Var[Y] (Gaussian channel)", claim_y, "2 tr(K^2) / b^2"),
            Derivation("Var[Z] = Cov[Y, Z] (Gaussian channel)", sp.factor(2 * m ** 2),
                       "2 (1'K1)^2 / b^4 = 2 1'K^2 1 / b^3, m = rho + (1 - rho) / b")]


def relu_kurtosis():
    """Kurtosis of relu(z), z ~ N(0, 1), for the finite-batch BatchNorm backward term."""
    z = sp.Symbol("z", real=True)
    phi = sp.exp(-z ** 2 / 2) / sp.sqrt(2 * sp.pi)
    m = [sp.integrate(z ** k * phi, (z, 0, sp.oo)) for k in range(5)]
    mu, var = m[1], m[2] - m[1] ** 2
    c4 = m[4] - 4 * mu * m[3] + 6 * mu ** 2 * m[2] - 3 * mu ** 4
    k = sp.simplify(c4 / var ** 2)
    claim = (6 * sp.pi ** 2 - 10 * sp.pi - 3) / (sp.pi - 1) ** 2
    if sp.simplify(k - claim) != 0:
        raise AssertionError(f"kurtosis of relu(z): derived {k}, finite.py uses {claim}")
    return Derivation("kurtosis of relu(z)", claim,
                      f"E[(r - E r)^4] / Var[r]^2 = {float(claim):.6f}; "
                      "BatchNorm's backward gain at batch b is 1 + (kurtosis - 2)/b of 1/v")


def gram_entry_modes():
    """The three ways a realised Gram's off-diagonal entries fluctuate, for one Gaussian
    channel z of correlation rho (z_i = sqrt(rho) g + sqrt(1 - rho) u_i): X_ij = z_i z_j.

    For an exchangeable array, Var X_ij = pair + 2 row + common with common = Cov[X_ij, X_kl],
    row = Cov[X_ij, X_ik] - common (an input's own shift, shared by its b - 1 entries) and
    pair the rest. Double centring (BatchNorm's H K H) keeps only the pair mode."""
    rho = sp.Symbol("rho", positive=True)
    g, u1, u2, u3, u4 = sp.symbols("g u1:5", real=True)
    z = [sp.sqrt(rho) * g + sp.sqrt(1 - rho) * u for u in (u1, u2, u3, u4)]

    def expect(expr):
        # Gaussian moments of independent N(0, 1) factors: E[x^2] = 1, E[x^4] = 3.
        poly = sp.Poly(sp.expand(expr), g, u1, u2, u3, u4)
        moment = {0: 1, 1: 0, 2: 1, 3: 0, 4: 3}
        return sp.simplify(sum(c * sp.prod(moment[k] for k in mon) for mon, c in poly.terms()))
    mean = expect(z[0] * z[1])
    var = expect((z[0] * z[1]) ** 2) - mean ** 2
    cov_row = expect(z[0] * z[1] * z[0] * z[2]) - mean ** 2
    common = expect(z[0] * z[1] * z[2] * z[3]) - mean ** 2
    row = sp.simplify(cov_row - common)
    pair = sp.factor(sp.simplify(var - 2 * row - common))
    if sp.simplify(pair - (1 - rho) ** 2) != 0 or sp.simplify(2 * row + common - 2 * rho) != 0 \
            or sp.simplify(var - 1 - rho ** 2) != 0:
        raise AssertionError(f"Gram entry modes: pair {pair}, row {row}, common {common}")
    return [Derivation("n Var[K_ij] / q^2 (Gaussian channels)", sp.expand(var),
                       "pair (1 - rho)^2 + rows 2 rho (1 - rho) + common 2 rho^2"),
            Derivation("pair mode of K_ij (Gaussian channels)", pair,
                       "what double centring leaves; finite._pair_after's e^2 for a fresh "
                       "weight layer and finite._merge_kappa's rest = 2 rho")]


def relu_pair_slope():
    """d rho_out / d rho_in of a ReLU at fixed q (how a ReLU carries a Gram entry's
    covariance with anything upstream): the arc-cosine kernel's slope relative to
    q_out / q_in = 1/2, which Price's theorem gives as E[1(u > 0) 1(v > 0)]."""
    rho = sp.Symbol("rho")
    kernel = (sp.sqrt(1 - rho ** 2) + (sp.pi - sp.acos(rho)) * rho) / (2 * sp.pi)  # q_in = 1
    slope = sp.simplify(sp.diff(kernel, rho) / sp.Rational(1, 2))
    claim = sp.Rational(1, 2) + sp.asin(rho) / sp.pi
    if sp.simplify(sp.expand_trig(slope - claim).rewrite(sp.asin)) != 0:
        raise AssertionError(f"relu slope: derived {slope}, finite._relu_pair uses {claim}")
    return Derivation("d rho_out / d rho_in (ReLU)", claim,
                      "2 E[1(u > 0) 1(v > 0)] = 2 (1/4 + asin(rho) / (2 pi))")


def relu_row_mode():
    """How one input's own deviation passes a ReLU, z ~ N(0, 1) over the channels: its
    relative second moment a (slope 1: positive homogeneity), its mean over the channels m
    (a shift along the all-ones direction moves the ReLU's mass: slope 2 E[relu(z)] /
    E[relu(z)^2]), and a rest of its own, what relu(z)^2 keeps beyond its regression on z^2
    and z. And the mean of relu(z)'s channels moves by P(z > 0) = 1/2 of a shift and by
    E[relu(z)] / 2 of a relative size. finite._relu_row computes these at any rho by
    quadrature; at rho = 0 they are:"""
    z = sp.Symbol("z", real=True)
    phi = sp.exp(-z ** 2 / 2) / sp.sqrt(2 * sp.pi)

    def pos(expr):
        return sp.integrate(expr * phi, (z, 0, sp.oo))
    p = pos(z ** 2)                                    # q_out = 1/2
    c1 = sp.simplify(pos(z ** 3) / p)                  # Cov[relu^2, z] / (Var z q_out)
    spread = sp.simplify((pos(z ** 4) - p ** 2) / p ** 2)
    cov_a = sp.simplify((pos(z ** 4) - p * 1) / p)     # Cov[relu^2, z^2] / (q_out Var-scale)
    slope_a = sp.simplify(cov_a / 2)                   # Var[z^2] = 2
    rest = sp.simplify(spread - 2 * slope_a ** 2 - c1 ** 2)
    m_on_m = sp.simplify(pos(1 + 0 * z) / sp.sqrt(p))  # P(z > 0) / sqrt(q_out) per unit shift
    m_on_a = sp.simplify(pos(z) / 2 / sp.sqrt(p))      # E[relu] / 2 / sqrt(q_out)
    claims = ((slope_a, 1), (c1, 4 / sp.sqrt(2 * sp.pi)), (rest, 3 - 8 / sp.pi),
              (m_on_m, 1 / sp.sqrt(2)), (m_on_a, 1 / (2 * sp.sqrt(sp.pi))))
    for got, want in claims:
        if sp.simplify(got - want) != 0:
            raise AssertionError(f"relu row mode: derived {got}, expected {want}")
    return [Derivation("d a_out / d a (ReLU, rho = 0)", slope_a, "positive homogeneity"),
            Derivation("d a_out / d m (ReLU, rho = 0)", c1,
                       "2 E[relu(z)] / E[relu(z)^2] = 4 / sqrt(2 pi) = 1.596"),
            Derivation("rest of a_out (ReLU, rho = 0)", rest,
                       "n Var of relu's own part of q_i: 5 - 2 - 8/pi = 0.454"),
            Derivation("d m_out / (d m, d a) (ReLU, rho = 0)", (m_on_m, m_on_a),
                       "P(z > 0) / sqrt(q_out), E[relu(z)] / (2 sqrt(q_out))")]


def gaussian_draw_keeps_the_relu_mean():
    """A ReLU's output correlation over a realised Gram: each input's size s_i enters as
    sqrt(s_i s_j) F(rho_ij) (F the arc-cosine kernel, relative to q_out), so inputs whose
    sizes spread by Var = T / n lower the mean by (T / 4n)(F - rho F') against the mean
    Gram's rho, and correlations that spread by V / n raise it by F'' V / (2n). For channels
    drawn afresh from a fixed Gram, T = 2 (1 - rho^2) and V = (1 - rho^2)^2 (the sample
    correlation's variance), and the two cancel exactly: the draw leaves the mean where it
    was (the law of a fresh weight layer's output is the kernel of its input), and only what
    the realised Gram carries beyond a draw moves it (finite._row_shift)."""
    rho = sp.Symbol("rho", positive=True)
    F = (sp.sqrt(1 - rho ** 2) + (sp.pi - sp.acos(rho)) * rho) / sp.pi
    F1, F2 = sp.diff(F, rho), sp.diff(F, rho, 2)
    T, V = 2 * (1 - rho ** 2), (1 - rho ** 2) ** 2
    shift = sp.simplify(-T / 4 * (F - rho * F1) + F2 * V / 2)
    if shift != 0:
        raise AssertionError(f"a Gaussian draw moves the ReLU's mean by {shift}")
    return Derivation("ReLU mean shift of a Gaussian draw", shift,
                      "-(T/4)(F - rho F') + (V/2) F'' at T = 2 (1 - rho^2), V = (1 - rho^2)^2")


def realised_gram_traces(bs=range(2, 6)):
    """The noise a realised Gram adds to a weight layer's (Y, Z) covariance (finite._wishart)
    and to a merge's cross term (finite.Walker.cross): E tr(d d'), E (d 1).(d' 1) and
    E (1'd 1)(1'd' 1) for two noise arrays d, d' over b inputs whose entries fluctuate by
    exchangeable modes, d_ij = gamma + r_i + r_j + p_ij (i != j), d_ii = gamma + d_i, with
    covariances Cov[gamma, gamma'] = vc, Cov[r_i, r_i'] = vr, Cov[p_ij, p_ij'] = vp,
    Cov[d_i, d_i'] = tau, Cov[d_i, r_i'] = Cov[r_i, d_i'] = c and all else independent.
    Expanded for b = 2..5 and compared with the closed forms finite._gram_noise evaluates
    (times b^2, b^3, b^4). Then the channel variance's part: for Gaussian channels
    (vc, vr, vp, tau, c) = (2 rho^2, rho (1 - rho), (1 - rho)^2, 2 (1 - rho^2), 2 rho (1 - rho))
    the noise of Var[Y - Z] is of order (1 - rho)^2: a variance's relative noise stays
    finite as rho -> 1 (adding the entries' noise to Var[Y] alone gave 4 rho / (1 - rho)^2)."""
    vc, vr, vp, tau, c, b_ = sp.symbols("v_c v_r v_p tau c b")
    claims = (b_ ** 2 * vc + 2 * b_ * (b_ - 1) * vr + b_ * (b_ - 1) * vp + b_ * tau,
              b_ * (b_ ** 2 * vc + b_ * (b_ - 1) * vr + (b_ - 1) * vp + tau + 2 * (b_ - 1) * c),
              b_ ** 4 * vc + 4 * b_ * (b_ - 1) ** 2 * vr + 2 * b_ * (b_ - 1) * vp + b_ * tau
              + 4 * b_ * (b_ - 1) * c)
    for b in bs:
        def noise(tag):
            g = sp.Symbol(f"g{tag}")
            r = [sp.Symbol(f"r{i}{tag}") for i in range(b)]
            d = [sp.Symbol(f"d{i}{tag}") for i in range(b)]
            p = {(i, j): sp.Symbol(f"p{min(i, j)}_{max(i, j)}{tag}")
                 for i in range(b) for j in range(b) if i != j}
            return sp.Matrix(b, b, lambda i, j: g + d[i] if i == j else g + r[i] + r[j] + p[(i, j)])
        D, E = noise(""), noise("'")
        cov = {("g", "g"): vc}
        for i in range(b):
            cov[(f"r{i}", f"r{i}")] = vr
            cov[(f"d{i}", f"d{i}")] = tau
            cov[(f"d{i}", f"r{i}")] = cov[(f"r{i}", f"d{i}")] = c
            for j in range(i + 1, b):
                cov[(f"p{i}_{j}", f"p{i}_{j}")] = vp

        def expect(expr):
            out = sp.Integer(0)
            for term in sp.Add.make_args(sp.expand(expr)):
                coeff, syms = sp.Integer(1), []
                for f in sp.Mul.make_args(term):
                    if f.is_Symbol:
                        syms.append(f.name)
                    elif f.is_Pow:
                        syms += [f.base.name] * int(f.exp)
                    else:
                        coeff *= f
                (x,) = [s for s in syms if not s.endswith("'")]
                (y,) = [s[:-1] for s in syms if s.endswith("'")]
                out += coeff * cov.get((x, y), 0)
            return sp.expand(out)
        one = sp.ones(b, 1)
        got = (expect((D * E).trace()), expect(((D * one).T * (E * one))[0]),
               expect((one.T * D * one)[0] * (one.T * E * one)[0]))
        for k, (g_, want) in enumerate(zip(got, claims)):
            if sp.expand(g_ - want.subs(b_, b)) != 0:
                raise AssertionError(f"realised Gram trace {k} at b = {b}: {g_} against {want.subs(b_, b)}")
    rho = sp.Symbol("rho", positive=True)
    gauss = {vc: 2 * rho ** 2, vr: rho * (1 - rho), vp: (1 - rho) ** 2, tau: 2 * (1 - rho ** 2),
             c: 2 * rho * (1 - rho)}
    # Var[Y - Z] = 2 tr(C K C K) / b^2 (C the centring): tr - 2 row / b + sum / b^2, per b^2.
    tr, row, tot = (x.subs(gauss) for x in claims)
    variance_noise = sp.factor(sp.simplify(tr - 2 * row / b_ + tot / b_ ** 2))
    if sp.simplify(variance_noise / (1 - rho) ** 2).has(rho):
        raise AssertionError(f"a variance's realised-Gram noise {variance_noise} is not of order (1 - rho)^2")
    return [Derivation("n E tr(d d'), n E (d 1).(d' 1), n E (1'd 1)(1'd' 1)", claims,
                       "expanded over index patterns for b = 2..5 (finite._gram_noise)"),
            Derivation("n b^2 E Var[Y - Z] added by a realised Gaussian Gram", variance_noise,
                       "the pairs' and the centred diagonal's: of order (1 - rho)^2")]


def scaled_ws_row_mode():
    """How Scaled WS maps each input's own deviation (finite._WS_ROW): its rows sum to zero,
    so it reads h_i - h-bar_i 1 (h = relu(z), h-bar_i the input's mean over the channels),
    whose second moment is |h_i|^2 / n - h-bar_i^2 and whose projection on the batch mean
    loses n (h-bar_i - h-bar) h-bar. With q_h = q / 2, E[relu] = sqrt(q / (2 pi)) and
    q_c = q_h - E[relu]^2, to first order in the input's own (a, m, u) (relative to q_h,
    m in units of sqrt(q_h)):"""
    eps, a, m, u = sp.symbols("epsilon a m u")
    qh = sp.Rational(1, 2)
    mean = 1 / sp.sqrt(2 * sp.pi)
    qc = qh - mean ** 2
    second = qh * (1 + eps * a) - (mean + eps * sp.sqrt(qh) * m) ** 2
    a_c = sp.simplify(sp.diff(second, eps).subs(eps, 0) / qc)
    proj = qh * eps * u - mean * eps * sp.sqrt(qh) * m
    u_c = sp.simplify(sp.diff(proj, eps) / qc)
    want_a = (sp.pi * a - 2 * sp.sqrt(sp.pi) * m) / (sp.pi - 1)
    want_u = (sp.pi * u - sp.sqrt(sp.pi) * m) / (sp.pi - 1)
    if sp.simplify(a_c - want_a) != 0 or sp.simplify(u_c - want_u) != 0:
        raise AssertionError(f"Scaled WS row map: a -> {a_c}, u -> {u_c}")
    return Derivation("Scaled WS: (a, u) of h - h-bar_i", (want_a, want_u),
                      "|h_i - h-bar_i|^2 = |h_i|^2 - n h-bar_i^2, linearised in the own deviation")


def fixed_norm_rows():
    """Scaled WS's rows have a fixed norm: w = sqrt(n) g / |g| for g ~ N(0, I_n). Since |g|
    and g / |g| are independent, a degree-two product keeps its Gaussian value exactly,
    E[relu(w.x) relu(w.y)] = n E[relu(g.x) relu(g.y)] / E|g|^2, while a degree-one mean is
    E[relu(w.x)] = sqrt(n) E[relu(g.x)] / E|g| with E|g| = sqrt(2) Gamma((n+1)/2) / Gamma(n/2)
    = sqrt(n) (1 - 1/(4n) + O(1/n^2)): two different channels' product of means is raised
    by 1/(2n) (finite._ws_shift's fixed-norm term, E[relu]^2 / (2n))."""
    n = sp.Symbol("n", positive=True)
    ratio = sp.sqrt(2) * sp.gamma((n + 1) / 2) / sp.gamma(n / 2) / sp.sqrt(n)
    first = sp.limit(n * (ratio - 1), n, sp.oo)   # E|g| / sqrt(n) = 1 + first / n + ...
    if sp.limit(ratio, n, sp.oo) != 1 or first != sp.Rational(-1, 4):
        raise AssertionError(f"E|g| / sqrt(n) = 1 + ({first}) / n, expected 1 - 1/(4n)")
    raised = -2 * first  # (E|g| / sqrt(n))^-2 = 1 + 1/(2n) + ...
    return Derivation("fixed-norm rows: E[relu(w.x)]^2 / E_gauss[relu(g.x)]^2 - 1", raised / n,
                      "(E|g| / sqrt(n))^-2 - 1 to first order in 1/n (limit of the Gamma ratio)")


def relu_pair_moments():
    """The bivariate moments the position spread sums over sample pairs
    (propagation/finite_positions.py), for unit-variance Gaussians of correlation
    r = cos(theta): E[relu(x)^p relu(y)^q] = E[R^(p+q)] / (2 pi) times the integral of
    cos(phi)^p cos(phi - theta)^q over the angles where both are positive,
    phi in (theta - pi/2, pi/2), with E[R^k] = 2^(k/2) Gamma(1 + k/2) for the radius of a
    2-d standard Gaussian."""
    t, phi = sp.symbols("theta phi", real=True)

    def moment(p, q):
        radius = 2 ** sp.Rational(p + q, 2) * sp.gamma(1 + sp.Rational(p + q, 2))
        angle = sp.integrate(sp.cos(phi) ** p * sp.cos(phi - t) ** q, (phi, t - sp.pi / 2, sp.pi / 2))
        return sp.simplify(radius * angle / (2 * sp.pi))

    r = sp.cos(t)
    claims = {
        (1, 1): (sp.sin(t) + (sp.pi - t) * r) / (2 * sp.pi),
        (1, 2): (1 + r) ** 2 / (2 * sp.sqrt(2 * sp.pi)),
        (2, 2): (3 * sp.sin(t) * r + (sp.pi - t) * (1 + 2 * r ** 2)) / (2 * sp.pi)}
    out = []
    for (p, q), claim in claims.items():
        derived = moment(p, q)
        # At 7 angles in (0, pi): the closed forms are exact, the check numeric to 1e-12.
        for v in (0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
            if abs(float((derived - claim).subs(t, v))) > 1e-12:
                raise AssertionError(f"E[relu^{p} relu^{q}]: derived {derived}, used {claim}")
        out.append(Derivation(f"E[relu(x)^{p} relu(y)^{q}]", claim,
                              "angular integral of the 2-d Gaussian (theta = acos r)"))
    return out


def relu_offset_slope():
    """d/dc of sd_a sd_b kappa_1(K_ab / (sd_a sd_b)) when every entry of K, variances
    included, moves by c (a common offset, finite_positions._relu_pass's dK):
    slope(r) + sin(theta) / (4 pi) (sd_a / sd_b + sd_b / sd_a)."""
    c, k, va, vb = sp.symbols("c k v_a v_b", positive=True)
    f = sp.sqrt((va + c) * (vb + c))
    r = (k + c) / f
    kappa = (sp.sqrt(1 - r ** 2) + (sp.pi - sp.acos(r)) * r) / (2 * sp.pi)
    derived = sp.diff(f * kappa, c).subs(c, 0)
    r0 = k / sp.sqrt(va * vb)
    claim = ((sp.pi - sp.acos(r0)) / (2 * sp.pi) + sp.sqrt(1 - r0 ** 2) / (4 * sp.pi)
             * (sp.sqrt(va / vb) + sp.sqrt(vb / va)))
    for vals in ({k: 0.3, va: 1.0, vb: 2.0}, {k: -0.5, va: 0.7, vb: 0.9}, {k: 0.0, va: 1.0, vb: 1.0}):
        if abs(float((derived - claim).subs(vals))) > 1e-12:
            raise AssertionError(f"offset slope: derived {derived}, used {claim}")
    return Derivation("d/dc [sd_a sd_b kappa_1] at a common offset c", claim,
                      "chain rule through r = (K_ab + c) / sqrt((K_aa + c)(K_bb + c))")


def sphere_quadratic_forms():
    """Scaled WS draws a row w uniformly on the sphere |w|^2 = D (D zero-mean directions of
    the fan-in), not from N(0, I_D): E[w_i w_j w_k w_l] = D / (D + 2) (d_ij d_kl + d_ik d_jl +
    d_il d_jk), so Cov(w'Aw, w'Bw) = D / (D + 2) (tr A tr B + 2 tr AB) - tr A tr B, and in
    relative terms D / (D + 2) (C - 2 / D) for the Gaussian's C = 2 tr AB / (tr A tr B)
    (finite_positions' Scaled-WS convolution)."""
    D = sp.Symbol("D", positive=True)
    a, b, ab = sp.symbols("trA trB trAB", positive=True)
    cov = D / (D + 2) * (a * b + 2 * ab) - a * b
    claim = D / (D + 2) * (2 * ab / (a * b) - 2 / D)
    if sp.simplify(cov / (a * b) - claim) != 0:
        raise AssertionError(f"sphere quadratic forms: {sp.simplify(cov / (a * b))}")
    # The fourth moment itself: E[w_1^4] = 3 D / (D + 2) for |w|^2 = D (a Beta(1/2, (D-1)/2)
    # share of D), which fixes the constant of the isotropic form above.
    x = sp.Symbol("x", positive=True)
    beta = x ** sp.Rational(-1, 2) * (1 - x) ** ((D - 3) / 2) / sp.beta(sp.Rational(1, 2), (D - 1) / 2)
    m2 = sp.simplify(sp.integrate(x ** 2 * beta, (x, 0, 1), conds="none") * D ** 2)
    if sp.simplify(m2 - 3 * D / (D + 2)) != 0:
        raise AssertionError(f"E[w_1^4] on the sphere: {m2}")
    return Derivation("Cov(w'Aw, w'Bw) / (trA trB), w on the sphere of radius sqrt(D)", claim,
                      "isotropic fourth moments, E[w_1^4] = 3 D / (D + 2)")


def derivations():
    return ([pattern_counts()] + relu_truncated_moments() + wishart_covariance()
            + [relu_kurtosis()] + gram_entry_modes() + [relu_pair_slope()] + relu_row_mode()
            + [gaussian_draw_keeps_the_relu_mean()] + realised_gram_traces() + [scaled_ws_row_mode()]
            + [fixed_norm_rows()] + relu_pair_moments() + [relu_offset_slope()]
            + [sphere_quadratic_forms()])
