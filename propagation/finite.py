"""Finite-width theory: the distribution over initialisations of one network's statistics.

The infinite-width recursion (``predict``) gives the mean state of every tensor: its second
moment q and the correlation rho between two different inputs. A network of width n is one
draw. To leading order in 1/n its statistics are Gaussian in log space around a shifted
centre, and this module derives that distribution layer by layer from the maps themselves.

The state of a tensor
---------------------
Over a batch of b exchangeable inputs, the Gram matrix of a tensor over its n channels is
K = (1/n) sum_c x_c x_c^T (x_c: channel c over the batch). The statistics ``measure`` reads
are linear in K: the second moment q = tr K / b and the squared channel mean
m = 1^T K 1 / b^2, so that with the mean off-diagonal entry c = rho q,
m = c + (q - c) / b and v = q - m = (q - c)(1 - 1/b). The fluctuation of a tensor is the
pair (dq / q, dc / q): a Gaussian vector with a mean (the 1/n shift) and a covariance.

Where fluctuations come from (each 1/n)
---------------------------------------
* A weight layer samples its n output channels, given its input, as i.i.d. N(0, s^2 K_in):
  the output Gram is a Wishart draw around its mean, with covariance (1/n) Cov[(Y, Z)] of
  one channel's Y = mean_i z_i^2 and Z = (mean_i z_i)^2 (``channel_covariance``).
* An elementwise nonlinearity phi maps the channels of its input exactly, but its output
  Gram is not a function of the input Gram alone: for channels that are Gaussian given a
  covariance S, K_phi = F(S) + e_phi and K_in = S + e_in, so
  K_phi = F(K_in) + (e_phi - J e_in), J the Jacobian of the mean map F. The residual
  e_phi - J e_in is the nonlinearity's own noise (Var[relu(z)^2] of the 7/n rule is in it),
  computed from the joint one-channel moments of (z, phi(z)).
* A residual merge y = s + f adds the cross term 2 s.f / (n b): given s, f = W h is
  Gaussian with covariance s^2 K_h, so the cross term has variance 4 tr(A K_s A K_f) / n for
  the statistic tr(A K) (A = I / b for q, 11^T / b^2 for m). Along the batch's common
  direction this does not average over the batch: it is what keeps normalised networks'
  spread finite but not 1/b-small.
* Normalisations fix what they normalise: BatchNorm's q and m are exact (no spread passes
  it), LayerNorm maps K to D^-1/2 K D^-1/2 (its Jacobian, no noise of its own).

What (q, c) does not hold: the realised Gram's own entries
------------------------------------------------------------
A weight layer's Wishart noise, and a merge's cross term, depend on tr(K^2), |K 1|^2 and
(1'K1)^2, and so on the noise of each entry of the realised K, not only on q and c. Every
mode of that noise enters all three (``_gram_noise``, derived in
derivations/finite_width.py); the channel variance, which reads the double-centred Gram,
sees only the pairs' and the centred diagonal's, of order (1 - rho)^2 for Gaussian
channels. (Counting the entries' noise in tr(K^2) alone, as this walk once did, gave the
channel variance a relative noise of 4 rho / (1 - rho)^2 per layer: along a post-LN
stream, where rho -> 1, its predicted spread grew exponentially, 2.1 nats by block 30 at
width 64 against 0.76 measured.) The off-diagonal entries' noise has
three modes (derivations/finite_width.py): a common one (c itself), a row per input, and
each pair's own, (1 - rho)^2 / n for Gaussian channels. The pair mode compounds: a fresh
weight layer adds its own draw to the input's, a ReLU carries the input's through its
slope and adds a residual, BatchNorm (double centring) keeps only it. The walk carries it
per tensor (``_pair_after``): after ten BatchNorm blocks it is twice the Gaussian value,
as networks measure. At a merge, the operands' entries covary (the branch is computed
from the skip operand), which adds 4 (1 - 1/b) kappa q_s q_f / n^2 to the cross term's
variance: as large as the rest at b = n (``_merge_kappa``).

What the Gram does not hold: the channel means' common part
-----------------------------------------------------------
Every ReLU also reads the mean over the channels of the channel means, mu = mean_c x_c-bar,
as a shift of every input along the all-ones direction: its output's q and c move by
1.596 and 0.798 (1 + rho) per unit of mu / sqrt(q) (``_relu_shift_slope``). Each weight
layer draws a fresh mu (its mean row times the input's batch mean: m / (q n) in variance);
normalisations centre it away; along an unnormalised stream it persists and adds up, so
that every later branch drifts with it: the block input's fluctuation is (dq/q, dc/q,
dmu) and the walk carries mu's own form beside the (q, c) one (``_Walker.muf``). This is
most of the spread of an unnormalised stream's channel variance at depth (skipinit with
alpha = 0.1 over 100 blocks: sd of ln v 0.020 predicted, 0.021 measured, against 0.011
without it). The ReLU's own noise then leaves out its part linear in the channels' common
factors, which is this response.

What the mean Gram does not hold: each input's own deviation
------------------------------------------------------------
The row mode has a diagonal: each input's own second moment q_i, its mean over the channels
and its projection on the batch mean, (a_i, m_i, u_i) relative to q (``_row_after``). A
weight layer's output is, in law, its input's realised Gram: it keeps a and u and adds its
own draw; a ReLU keeps a (positive homogeneity) and adds 1.596 m (a shift along the
all-ones direction moves its mass); Scaled WS reads the ReLU output less each input's own
channel mean, a -> (pi a - 2 sqrt(pi) m) / (pi - 1); BatchNorm reads the centred (a - 2u) / e;
a merge's cross term 2 s_i.f_i / n rescales each input along itself. The walked (a, u) also
give the diagonal and row noise of the realised Gram that the next weight layer, or a
merge's cross term, reads (``_gram_noise``). In a BatchNorm stream the inputs' sizes
drift apart, n Var[q_i] / q^2 = 2 -> ~30 over 100 blocks, as networks measure, because each
branch's scale follows its input's ReLU mass and that mass follows the input's persistent
channel mean. Inputs of unequal sizes lower a ReLU's channel mean (sqrt(s_i s_j) F(rho_ij)):
a fresh Gaussian draw's own spread is exactly offset by its correlations' (derivations), and
what the realised Gram carries beyond a draw shifts the mean (``_row_shift``): BatchNorm's
channel variance at depth sits ~2.5 / n above its infinite-width value.

Scaled WS
---------
A Scaled-WS layer's rows sum to zero and have a fixed norm. It reads each input's ReLU
output less its own mean over the channels, so its noise is that of relu(z) - E[relu(z)]
(``_noise``'s "relu_ws": at rho = 0, 2.4 per 1/(n b) against the plain ReLU's 6.4 once
rescaled to the smaller q), and the fixed norm takes each channel's scale fluctuation out
of its Wishart noise (2/n of (E Y, E Z)(E Y, E Z)'): one ReLU + Scaled-WS layer spreads
ln q by 6.4 / (n b) in variance, measured 6.7. Its mean reads the kernel F - 1/pi, which a
draw's own spread no longer leaves in place, and fixed-norm rows before it raise
E[relu(w.x)] by 1/(4n) (``_ws_shift``; the share of a tensor drawn through such rows,
``_Walker.sphere``, mixes by the squared shares at a merge, as the pair mode does). Along
an NF stream the realised Gram drifts from a draw and the branches' squared mean climbs
above the batch's own floor: 0.55 log2 over 100 blocks at width 256, predicted 0.54.

The gradient
------------
Backwards, each block multiplies the gradient by 1 + chi_l (chi_l its branch's gain): the
branch's own noise (masks, transposed weights), the merge's cross term 2 tr(J G) / n, in
which tr(J) / n is common to every input (4 s (1 - s) / n^2 beside the 4 s (1 - s) / (n b)
of each input's own), and a coupling to the forward pass: a branch that normalises what it
reads divides the gradient by the realised statistic of the stream, so its chi moves with
the stream's fluctuation, which persists from block to block. ``_gain_slope`` takes that
slope from the mean recursion's own backward gain; the stream's fluctuation over every
source so far is carried beside the block-local forms.

Between layers the fluctuation propagates through the Jacobian of the layer's mean map,
and its mean through the Hessian as well (the 1/n correction of the mean: E[F(K)] =
F(E K) + 1/2 F'' Var K). Both are taken by finite differences of the layers' own ``forward``,
so every layer that ``predict`` has is covered without a second description of it.

Approximations (stated, and measured by ``make calibrate``)
-----------------------------------------------------------
* Channels are treated as Gaussian given their covariance (exact after a weight layer; for
  the residual stream, a sum of such, the leading order).
* The nonlinearity's residual noise is taken as fresh at every block. In fact the stream's
  channels persist from block to block, so the residuals of consecutive blocks correlate;
  for the gradient the dominant such term (the ReLU masks on the stream, shared by blocks
  whose streams are correlated) is included, see :func:`grad_spread`.
* Negative correlations (BatchNorm's -1/(b-1)) are set to 0 in the noise terms (an O(1/b)
  change of an O(1/n) term).
* Of a realised Gram's entry noise the pair mode and each input's own (a, u) are walked;
  the common mode is taken as Gaussian channels' (2 rho^2), and so are the rows in a
  merge's cross term when one operand is a projection (its shared pre chain's own draws
  are left out). The gradients' own Gram is walked backwards for
  gradients uncorrelated between inputs (``_gradient_pair_walk``), and the coupling is
  taken as independent of the branch's own backward noise.
* The expansion is in the fluctuation over its mean: it stops where the predicted standard
  deviation of a log statistic is no longer small (``Spread.valid`` marks positions where
  it is below 0.5 nats for q, m and v); there, at depth / width of order one, the
  log-normal shape and the 1/n mean shift are themselves only indicative.
"""
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from .layers import (MATH, BatchNorm, BlockGain, Gain, LayerNorm, ReLU, ReLUScaledWS, ReLUWeight, Zero,
                     backward_gain, run)
from . import kernels
from .profile import Stats

LN2 = math.log(2.0)
_RELUS = (ReLUWeight, ReLUScaledWS, ReLU)  # the layers that start with a ReLU
_VALID_SIGMA = 0.5  # nats: beyond this the second-order expansion in the fluctuation is indicative only
_VALID_SHIFT = 0.1  # nats: the largest first-order finite-batch shift of G that is trusted
#: Kurtosis of relu(z), z ~ N(0, 1): E[(r - E r)^4] / Var[r]^2, derived in derivations/finite_width.py.
_RELU_KURTOSIS = (6 * math.pi ** 2 - 10 * math.pi - 3) / (math.pi - 1) ** 2  # 5.4076


# --- one channel: moments of Y = mean_i f(z_i)^2 and Z = (mean_i f(z_i))^2 -------------------

_G = np.linspace(-10.0, 10.0, 8001)            # latent common factor g ~ N(0, 1)
_W = np.exp(-0.5 * _G ** 2)
_W /= _W.sum()                                 # trapezoid weights (the ends are ~e^-50)


def _relu_powers(mu, s):
    """E[relu(X)^k], k = 1..4, for X ~ N(mu, s^2), elementwise over mu (s > 0 scalar)."""
    from scipy.special import ndtr
    t = mu / s
    Phi = ndtr(t)
    phi = np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    m1 = mu * Phi + s * phi
    m2 = (mu * mu + s * s) * Phi + mu * s * phi
    m3 = (mu ** 3 + 3.0 * mu * s * s) * Phi + (mu * mu + 2.0 * s * s) * s * phi
    m4 = (mu ** 4 + 6.0 * mu * mu * s * s + 3.0 * s ** 4) * Phi + (mu ** 3 + 5.0 * mu * s * s) * s * phi
    return m1, m2, m3, m4


def _gauss_powers(mu, s):
    s2 = s * s
    return mu, mu * mu + s2, mu ** 3 + 3.0 * mu * s2, mu ** 4 + 6.0 * mu * mu * s2 + 3.0 * s2 * s2


@lru_cache(maxsize=4096)
def _channel_covariance(rho, b, with_ws=False):
    """Mean and covariance of (Y_z, Z_z, Y_r, Z_r, Y_t, Z_t) over one channel, where z is a
    batch of b exchangeable N(0, 1) values with correlation rho >= 0, r = relu(z) and
    t = r - E[r] (the ReLU output less its mean over everything: what Scaled WS, whose
    rows sum to zero, reads to first order, see _noise); the last two only ``with_ws``
    (they triple the cost, and only Scaled-WS layers read them).

    Given the common factor g (z_i = sqrt(rho) g + sqrt(1 - rho) e_i) the b values are
    i.i.d.; the moments of the sample statistics then follow from the element moments by
    counting index patterns (derivations/finite_width.py checks the counts with sympy), and
    the integral over g is a fine trapezoid rule (the conditional moments are smooth in g
    unless rho -> 1, where they approach the kinked relu(g) itself).
    """
    rho = min(max(rho, 0.0), 1.0 - 1e-9)
    mu = math.sqrt(rho) * _G
    s = math.sqrt(1.0 - rho)
    z = _gauss_powers(mu, s)
    r = _relu_powers(mu, s)
    r_bar = 1.0 / math.sqrt(2.0 * math.pi)     # E[relu(z)] for z ~ N(0, 1)
    # Each function as a polynomial in (z, r): {(i, j): coefficient} for z^i r^j.
    polys = ({(1, 0): 1.0}, {(0, 1): 1.0}) + (({(0, 1): 1.0, (0, 0): -r_bar},) if with_ws else ())

    def joint(i, j):
        # E[z^i r^j | g]: r^j z^i = r^(i+j) when j >= 1 (z = r where r > 0).
        if i + j == 0:
            return np.ones_like(_G)
        return r[i + j - 1] if j >= 1 else z[i - 1]

    def power(poly, p):
        out = {(0, 0): 1.0}
        for _ in range(p):
            nxt = {}
            for (i, j), c in out.items():
                for (k, l), d in poly.items():
                    nxt[(i + k, j + l)] = nxt.get((i + k, j + l), 0.0) + c * d
            out = nxt
        return out

    def mixed(f, h, p, q):
        # E[f^p h^q | g]
        total = np.zeros_like(_G)
        for (i, j), c in power(f, p).items():
            for (k, l), d in power(h, q).items():
                total = total + c * d * joint(i + k, j + l)
        return total

    bf = float(b)
    # Index patterns: all equal, two groups, three, four distinct.
    c1, c2 = bf, bf * (bf - 1.0)
    c3 = c2 * (bf - 2.0)
    c4 = c3 * (bf - 3.0)
    m1s = [mixed(f, {(0, 0): 1.0}, 1, 0) for f in polys]
    m2s = [mixed(f, {(0, 0): 1.0}, 2, 0) for f in polys]
    stats = [(m2, (bf * m2 + bf * (bf - 1.0) * m1 * m1) / bf ** 2) for m1, m2 in zip(m1s, m2s)]
    mean = np.array([np.dot(_W, s_) for pair in stats for s_ in pair])
    k = len(polys)
    cov = np.zeros((2 * k, 2 * k))
    for i, f in enumerate(polys):
        for j, h in enumerate(polys):
            f1, f2, h1, h2 = m1s[i], m2s[i], m1s[j], m2s[j]
            f2h2 = mixed(f, h, 2, 2)
            f2h1 = mixed(f, h, 2, 1)
            f1h2 = mixed(f, h, 1, 2)
            f1h1 = mixed(f, h, 1, 1)
            yy = (c1 * f2h2 + c2 * f2 * h2) / bf ** 2
            yz = (c1 * f2h2 + c2 * f2 * h2 + 2.0 * c2 * f2h1 * h1 + c3 * f2 * h1 * h1) / bf ** 3
            zy = (c1 * f2h2 + c2 * f2 * h2 + 2.0 * c2 * f1h2 * f1 + c3 * h2 * f1 * f1) / bf ** 3
            zz = (c1 * f2h2 + c2 * f2 * h2 + 2.0 * c2 * f1h1 * f1h1
                  + 2.0 * c2 * (f2h1 * h1 + f1h2 * f1)
                  + c3 * (f2 * h1 * h1 + h2 * f1 * f1 + 4.0 * f1h1 * f1 * h1)
                  + c4 * f1 * f1 * h1 * h1) / bf ** 4
            block = np.array([[np.dot(_W, yy), np.dot(_W, yz)], [np.dot(_W, zy), np.dot(_W, zz)]])
            cov[2 * i:2 * i + 2, 2 * j:2 * j + 2] = block
    cov -= np.outer(mean, mean)
    # Covariance of each statistic with the common factor g (E[g] = 0, Var[g] = 1).
    with_g = np.array([np.dot(_W, _G * s_) for pair in stats for s_ in pair])
    return mean, cov, with_g


def channel_covariance(rho: float, b: int):
    """(mean, covariance) of one channel's (Y, Z) for z and relu(z), z exchangeable N(0, 1)
    with correlation ``rho`` over ``b`` examples. Y = mean_i x_i^2, Z = (mean_i x_i)^2."""
    mean, cov, _ = _channel_covariance(round(float(rho), 10), int(b))
    return mean[:4], cov[:4, :4]


def _grid(rho):
    """rho on the grid the one-channel noise is computed and cached on: steps of 1e-3, and
    of 0.5% in 1 - rho above rho = 0.5 (where the noise depends on sqrt(1 - rho)). The noise
    is smooth in rho: a step moves it by ~1e-3 relative, against the theory's O(1/n)."""
    rho = float(rho)
    if rho > 0.5:
        return 1.0 - math.exp(round(200.0 * math.log(1.0 - min(rho, 1.0 - 1e-12))) / 200.0)
    if rho <= 0.0:
        return rho  # BatchNorm's exact -1/(b-1): a zero batch mean has no Z noise at all
    return round(rho, 3)


def _to_qc(b):
    """The linear map (dY, dZ) -> (dq, dc): q = Y, c = (b Z - Y) / (b - 1). One input
    (b = 1, the per-example walk) has no c: it is held at zero."""
    if b == 1:
        return np.array([[1.0, 0.0], [0.0, 0.0]])
    return np.array([[1.0, 0.0], [-1.0 / (b - 1.0), b / (b - 1.0)]])


def _wishart(rho, b, n_in=None, kp=None, row=None):
    """Covariance of one Gaussian channel's (Y, Z), z ~ N(0, K) over b inputs with
    K = (1 - rho) I + rho J (rho >= -1/(b-1)): Cov[z'Az, z'Bz] = 2 tr(AKBK) with A = I/b,
    B = J/b^2 gives Var Y = (2/b)(1 + (b-1) rho^2), Var Z = Cov[Y, Z] = 2 m^2,
    m = rho + (1 - rho)/b.

    ``n_in``: K is the realised Gram of an input of n_in channels, not its mean, and the
    three traces take its entries' noise: E tr(K^2), E |K 1|^2 and E (1'K1)^2 (Var Y, b^3
    Cov[Y, Z], b^4 Var Z). That noise is exchangeable over the inputs, K_ij = K-bar_ij +
    gamma + r_i + r_j + p_ij (i != j) and K_ii = K-bar_ii + gamma + d_i, with n Var of the
    common mode Vc = 2 rho^2, of each row's Vr and each pair's Vp, of each diagonal's tau
    and n Cov[d_i, r_i] = C (derivations/finite_width.py, ``realised_gram_traces``):

        n E tr(d^2)     = b^2 Vc + 2 b (b-1) Vr + b (b-1) Vp + b tau
        n E |d 1|^2     = b (b^2 Vc + b (b-1) Vr + (b-1) Vp + tau + 2 (b-1) C)
        n E (1'd 1)^2   = b^4 Vc + 4 b (b-1)^2 Vr + 2 b (b-1) Vp + b tau + 4 b (b-1) C.

    Where rho ~ 0 (after BatchNorm) the pairs' b^2 / n_in is as large as the diagonal's b
    when b ~ n_in: it doubles Var Y at b = n_in, and it is all of the spread of the channel
    variance there. The channel variance (Y - Z) reads the double-centred Gram, whose noise
    is the pairs' and the centred diagonal's (tau - 4 C + 4 Vr): for Gaussian channels both
    are of order (1 - rho)^2, so the variance's relative noise stays finite as rho -> 1.
    ``kp``: the pair mode Vp when it is not the Gaussian (1 - rho)^2; ``row``: the
    covariance of each input's own (a, m, u) (see _Walker.rowA), whose a and u give tau,
    Vr and C, when it is not the Gaussian channels' (_row_gauss).
    """
    m = rho + (1.0 - rho) / b
    vy, cyz, vz = 2.0 / b * (1.0 + (b - 1.0) * rho * rho), 2.0 * m * m, 2.0 * m * m
    if n_in:
        r = max(rho, 0.0)
        R = _row_gauss(r) if row is None else row
        t = _gram_noise(b, 2.0 * r * r, R[2, 2], (1.0 - r) ** 2 if kp is None else kp, R[0, 0], R[0, 2],
                        centred=rho < 0.0)
        vy, cyz, vz = vy + 2.0 * t[0] / n_in, cyz + 2.0 * t[1] / n_in, vz + 2.0 * t[2] / n_in
    return np.array([[vy, cyz], [cyz, vz]])


def _gram_noise(b, vc, vr, vp, tau, c, centred=False):
    """n times the excess of E tr(K K') / b^2, E (K 1).(K' 1) / b^3 and E (1'K1)(1'K'1) / b^4
    over the mean Grams' for two realised b x b Grams whose entries' noise covaries by modes
    (K_ij = gamma + r_i + r_j + p_ij off the diagonal, K_ii = gamma + d_i; see _wishart): n
    Cov of the common modes vc, of each row's vr, each pair's vp, each diagonal's tau, and
    n Cov[d_i, r_i'] = c. With K' = K these are the traces of a weight layer's (Y, Z)
    covariance; with K' another tensor's Gram, of a merge's cross term. ``centred``: one of
    them is centred over the batch (BatchNorm's output, rho = -1/(b-1)), so that its rows
    sum to exactly zero, realised or not: only the trace has noise."""
    bf = float(b)
    if centred:
        return (bf * (bf - 1.0) * vp + bf * tau) / bf ** 2, 0.0, 0.0
    e_tr = bf * bf * vc + 2.0 * bf * (bf - 1.0) * vr + bf * (bf - 1.0) * vp + bf * tau
    e_row = bf * (bf * bf * vc + bf * (bf - 1.0) * vr + (bf - 1.0) * vp + tau + 2.0 * (bf - 1.0) * c)
    e_sum = (bf ** 4 * vc + 4.0 * bf * (bf - 1.0) ** 2 * vr + 2.0 * bf * (bf - 1.0) * vp + bf * tau
             + 4.0 * bf * (bf - 1.0) * c)
    return e_tr / bf ** 2, e_row / bf ** 3, e_sum / bf ** 4


@lru_cache(maxsize=4096)
def _noise(rho, b, kind, n_in=None):
    """Relative (dq/q, dc/q) covariance, times n, of the fresh noise of one map at input
    correlation rho: "wishart" (a weight layer's output, Gaussian channels), "relu" (the
    residual of a ReLU on Gaussian channels, in its output's relative coordinates) or
    "relu_centred" (the same after a per-example centring over channels); "relu_ws" and
    "relu_ws_centred": the same for a ReLU followed by Scaled WS, whose rows sum to zero:
    it reads each input's ReLU output less its own mean over the channels, whose Gram is,
    to first order in that mean's deviation, the Gram of relu(z) - E[relu(z)] shifted by a
    constant (|h_i - h-bar_i|^2 / n = |h_i|^2 / n - h-bar_i^2 and h-bar_i^2 ~ E[relu]^2 +
    2 E[relu] (h-bar_i - E[relu])): its noise is that function's, relative to the smaller
    q (1 - 1/pi) / 2 (at rho = 0 and large b, 2.4 against the plain ReLU's 3 / (1 - 1/pi)^2
    = 6.4 per 1 / (n b))."""
    L = _to_qc(b)
    if kind == "wishart":
        return L @ _wishart(rho, b, n_in) @ L.T
    # The common-factor representation needs rho >= 0; a negative rho is BatchNorm's
    # -1/(b-1) (an O(1/b) correction to an O(1/n) term), taken as 0.
    ws = kind.startswith("relu_ws")
    mean, cov, with_g = _channel_covariance(max(rho, 0.0), b, ws)
    k = 4 if ws else 2      # the function's (Y, Z) rows: relu(z) - E[relu], or relu(z)
    Lz = L / mean[0]
    Lr = L / mean[k]
    czz = Lz @ cov[:2, :2] @ Lz.T
    crr = Lr @ cov[k:k + 2, k:k + 2] @ Lr.T
    crz = Lr @ cov[k:k + 2, :2] @ Lz.T
    J = _jacobian(ReLUScaledWS() if ws else ReLU(), 0.0, 1.0 - max(rho, 0.0), 0)[0]
    res = crr - J @ crz.T - crz @ J.T + J @ czz @ J.T
    if kind.endswith("_centred"):
        # After a per-example centring over channels (LayerNorm), the channels' common
        # factors average to exactly zero: the part of the residual linear in g, summed over
        # channels, is removed (project it out; Var[g] = 1).
        rg = Lr @ with_g[k:k + 2] - J @ (Lz @ with_g[:2])
        res = res - np.outer(rg, rg)
    return res


# --- maps in relative coordinates ------------------------------------------------------------

_H = 1e-4


def _apply(layer, lq, e, l, d):
    """The layer's output state, relative to its unperturbed output, for an input perturbed
    by d = (dq/q, dc/q)."""
    rho = 1.0 - e
    lq_in = lq + math.log2(1.0 + d[0])
    rho_in = (rho + d[1]) / (1.0 + d[0])
    lq0, e0 = layer.forward(lq, e, l, MATH)
    lq1, e1 = layer.forward(lq_in, 1.0 - rho_in, l, MATH)
    ratio = 2.0 ** (lq1 - lq0)
    return np.array([ratio - 1.0, (1.0 - e1) * ratio - (1.0 - e0)])


def _jacobian(layer, lq, e, l):
    """Jacobian (2x2) and Hessians (2 outputs x 2x2) of the layer's map in relative
    coordinates, by central differences (one-sided where rho sits at 0 or 1)."""
    rho = 1.0 - e
    h = _H
    # Keep the perturbed correlation inside [0, 1]: shift the stencil when rho is at an end.
    off = np.zeros(2)
    if rho - 2 * h < 0.0:
        off[1] = 2 * h - rho
    elif rho + 2 * h > 1.0:
        off[1] = 1.0 - 2 * h - rho

    def f(a, c):
        return _apply(layer, lq, e, l, (a + off[0], c + off[1]))

    f0 = f(0.0, 0.0)
    fa_p, fa_m = f(h, 0.0), f(-h, 0.0)
    fc_p, fc_m = f(0.0, h), f(0.0, -h)
    J = np.stack(((fa_p - fa_m) / (2 * h), (fc_p - fc_m) / (2 * h)), axis=1)
    Haa = (fa_p - 2 * f0 + fa_m) / h ** 2
    Hcc = (fc_p - 2 * f0 + fc_m) / h ** 2
    Hac = (f(h, h) - f(h, -h) - f(-h, h) + f(-h, -h)) / (4 * h * h)
    Hs = np.array([[[Haa[k], Hac[k]], [Hac[k], Hcc[k]]] for k in range(2)])
    if off.any():  # first-order correction of J for the shifted stencil
        J = J - np.einsum("kij,j->ki", Hs, off)
    return J, Hs


class _Form:
    """A tensor's relative fluctuation: mean ``mu`` and linear map ``M`` over independent
    sources. Source "x" is the block input's fluctuation (dq/q, dc/q, d mu), covariance
    ``cx``; every other source is a fresh unit Gaussian pair. A (dq/q, dc/q) form has two
    rows per source, the channel means' form (_Walker.muf) one."""

    def __init__(self, cols, mu):
        self.cols = cols   # source -> (rows, 3) for "x", (rows, 2) otherwise
        self.mu = mu

    def map(self, J):
        return _Form({k: J @ v for k, v in self.cols.items()}, J @ self.mu)

    def cov(self, cx):
        d = len(self.mu)
        out = np.zeros((d, d))
        for k, v in self.cols.items():
            out += v @ cx @ v.T if k == "x" else v @ v.T
        return out

    @staticmethod
    def combine(a, wa, b, wb):
        cols = {k: wa * v for k, v in a.cols.items()}
        for k, v in b.cols.items():
            cols[k] = cols.get(k, 0.0) + wb * v
        return _Form(cols, wa * a.mu + wb * b.mu)

    def add_noise(self, cov, key):
        cols = dict(self.cols)
        cols[key] = _root(cov)
        return _Form(cols, self.mu)


class _Walker:
    """Walks a scheme's block, carrying mean states and fluctuation forms."""

    def __init__(self, width, batch, depth):
        self.n = float(width)
        self.b = int(batch)
        self._key = 0
        # n Var / q^2 of the current tensor's Gram entries in their own pair mode (what
        # double centring leaves, see _entry_factors): (1 - rho)^2 for Gaussian channels,
        # more where realised Grams have passed through layers (they compound).
        self.kp = 0.0
        # Each input's own deviation (the row mode), as (a_i, m_i, u_i): its relative second
        # moment q_i / q - 1, its mean over the channels over sqrt(q), and its projection on
        # the batch mean over q ((x_i - x-bar).x-bar / (n q)), times sqrt(n). The current
        # tensor's is rowA @ (the block input's) + a fresh part of covariance rowF;
        # self.row_x is the block input's covariance (_row_after).
        self.rowA, self.rowF = np.eye(3), np.zeros((3, 3))
        self.row_x = np.zeros((3, 3))
        # The channel means' mean over the channels, over sqrt(q) (every input's shift
        # along the all-ones direction, which each later ReLU reads): a form over the same
        # sources, with a one-row column per source (the block input's is its third
        # coordinate).
        self.muf = _Form({}, np.zeros(1))
        # The share of the current tensor's q drawn through standardised (Scaled-WS) rows,
        # whose fixed norm raises E[relu(w.x)] by 1/(4n) (see _ws_shift).
        self.sphere = 0.0
        self.centred = False
        self.ln_inputs = {}  # block -> relative variance of q at each LayerNorm's input
        # Backward ingredients, recorded on each block's pre + branch (``record=True``): the
        # branch gain's own relative variance, its finite-batch mean shift (BatchNorm's
        # backward), and the first ReLU's correlation when it reads the stream's signs.
        self.own = np.zeros(depth)
        # Per block, its pre + branch in forward order as the backward pass needs them:
        # ("relu", rho) for a mask, ("weight",) for a transposed weight layer, whose noise
        # depends on the arriving gradients' Gram (see _gradient_pair_walk).
        self.tape = [[] for _ in range(depth)]
        self.bn_shift = np.zeros(depth)
        self.first_relu_rho = np.full(depth, np.nan)  # NaN: a norm centres the batch first
        self._first = self._prev_relu = False

    def start_block(self):
        """Begin recording a block's backward ingredients (its pre chain comes next)."""
        self._first, self._prev_relu = True, False

    def _record(self, layer, e, l):
        """The backward ingredients of ``layer`` at input correlation 1 - e, block l."""
        n, b = self.n, self.b
        if isinstance(layer, _RELUS):
            r = min(max(1.0 - e, 0.0), 1.0)
            self.own[l] += (5.0 / b + (1.0 - 1.0 / b) * (2.0 / math.pi) * math.asin(r)) / n
            self.tape[l].append(("relu", r))
            if self._first:
                self.first_relu_rho[l] = r
            self._first = False
        if isinstance(layer, BatchNorm):
            self.own[l] += 2.0 / (n * max(b - 1, 1))
            # Backwards BatchNorm divides by the sample variance s^2 and projects out the
            # batch mean and the normalised input: E[1/s^2] (1 - 2/b) v = 1 + (kurtosis - 2)/b
            # to first order (exactly (b-2)/(b-3) for a Gaussian channel). After a bare ReLU
            # the channel is a rectified Gaussian (kurtosis 5.41), otherwise Gaussian (3).
            kurt = _RELU_KURTOSIS if self._prev_relu else 3.0
            self.bn_shift[l] += (kurt - 2.0) / b
            self._first = False
        if layer.is_weight_layer:
            self.tape[l].append(("weight",))
        self._prev_relu = isinstance(layer, ReLU)

    def fresh(self):
        self._key += 1
        return self._key

    def layer(self, layer, form, lq, e, l, cx, centred=False, record=False):
        """Apply one layer: returns the output form and mean state. ``centred``: the input
        was just centred per example over its channels (LayerNorm); ``record``: the layer
        is on the block's branch (pre included), whose backward ingredients are kept."""
        if record:
            self._record(layer, e, l)
        if isinstance(layer, Zero) or (isinstance(layer, Gain) and layer.a == 0.0):
            return None, -math.inf, 1.0
        lq_o, e_o = layer.forward(lq, e, l, MATH)
        kp_in, muf_in = self.kp, self.muf
        tau_in = float((self.rowA @ self.row_x @ self.rowA.T + self.rowF)[0, 0])
        self.kp = _pair_after(layer, self.kp, e, e_o)
        self.rowA, self.rowF = _row_after(layer, self.rowA, self.rowF, e, e_o)
        if layer.normalises:
            self.muf = _Form({}, np.zeros(1))  # every channel (or input) centred
        elif isinstance(layer, ReLU):
            self.muf = muf_in.map(np.array([[math.sqrt(0.5)]]))  # P(z > 0) of a shift
        elif layer.is_weight_layer:
            # The output's channel means are the mean of the weight rows times the input's
            # batch mean: a fresh draw, m_out / (q_out n) in variance.
            fm = max(1.0 - e_o, 0.0) * (1.0 - 1.0 / self.b) + 1.0 / self.b
            self.muf = _Form({self.fresh(): np.array([[math.sqrt(fm / self.n), 0.0]])}, np.zeros(1))
        if isinstance(layer, BatchNorm):
            # Exactly q = 1 and a zero batch mean per channel: at batch b the correlation
            # between two different inputs is -1/(b-1), not the infinite batch's 0.
            return _Form({}, np.zeros(2)), lq_o, (1.0 + 1.0 / (self.b - 1.0)) if self.b > 1 else e_o
        if isinstance(layer, (Gain, BlockGain)):
            return form, lq_o, e_o
        if isinstance(layer, LayerNorm):
            self.ln_inputs.setdefault(l, []).append(float(form.cov(cx)[0, 0]))
        J, Hs = _jacobian(layer, lq, e, l)
        c_in = form.cov(cx)
        shift = 0.5 * np.einsum("kij,ij->k", Hs, c_in)
        out = form.map(J)
        out.mu = out.mu + shift
        rho_in = 1.0 - e
        if isinstance(layer, (ReLUWeight, ReLU)):
            # The realised Gram's row and pair modes move the ReLU's mean (a weight layer
            # after it is linear: relative entries pass).
            out.mu = out.mu + np.array([0.0, _row_shift(rho_in, tau_in, kp_in, self.n)])
        elif isinstance(layer, ReLUScaledWS):
            out.mu = out.mu + _ws_shift(rho_in, tau_in, kp_in, self.sphere, self.n)
        if isinstance(layer, _RELUS) and muf_in.cols:
            # An input shifted along the all-ones direction moves the ReLU's mass: its
            # output's (q, c) follow the channel means' common part.
            out = _Form.combine(out, 1.0, muf_in.map(_relu_shift_slope(layer, rho_in)), 1.0)
        if isinstance(layer, _RELUS):
            # Its own noise: the part linear in the channels' common factors is the response
            # to their mean over the channels, which the channel means' form carries (and
            # which persists along the stream): left out here, as after a LayerNorm.
            kind = "relu_ws" if isinstance(layer, ReLUScaledWS) else "relu"
            if centred or muf_in.cols:
                kind += "_centred"
            out = out.add_noise(_noise(_grid(rho_in), self.b, kind) / self.n, self.fresh())
        if layer.is_weight_layer:
            # The weights' input Gram is realised: its pair mode is what the walk carries
            # (the output's own fresh part, e_o^2, is the last thing _pair_after added).
            kp_in = self.kp - e_o * e_o
            # Its inputs' own (a, m, u), before the output's own draw (_row_after).
            row_in = (self.rowA @ self.row_x @ self.rowA.T + self.rowF
                      - _row_gauss(max(1.0 - e_o, 0.0)))
            L = _to_qc(self.b)
            rho_o = _grid(1.0 - e_o)
            cov = _wishart(rho_o, self.b, int(self.n), kp_in, row_in)
            if isinstance(layer, ReLUScaledWS):
                # Standardised rows have a fixed norm: for w uniform on a sphere,
                # Cov[w'Aw, w'Bw] = (2 tr(AB) - 2 tr(A) tr(B) / n) / (n (n + 2)), so each
                # channel loses its overall scale's fluctuation, 2/n of (E Y, E Z) (E Y, E Z)'.
                # One ReLU + Scaled-WS layer at rho = 0, n = b = 128: n b Var[ln q] 6.7
                # measured, 8.5 with Gaussian zero-sum rows (the walk without this: 8.46).
                mz = rho_o + (1.0 - rho_o) / self.b
                cov = (cov * self.n - 2.0 * np.outer([1.0, mz], [1.0, mz])) / (self.n + 2.0)
            out = out.add_noise(L @ cov @ L.T / self.n, self.fresh())
            self.sphere = 1.0 if isinstance(layer, ReLUScaledWS) else 0.0
        return out, lq_o, e_o

    def chain(self, layers, form, lq, e, l, cx, centred=False, record=False):
        """Apply ``layers``; ``centred``: whether the input is centred per example (then
        ``self.centred`` says whether the output is); ``record``: as :meth:`layer`."""
        for layer in layers:
            if form is None:
                self.centred = False
                return None, -math.inf, 1.0
            form, lq, e = self.layer(layer, form, lq, e, l, cx, centred, record)
            # torch's LayerNorm centres each example over its channels (the reference
            # networks' and the schemes' LayerNorm); a scalar gain keeps that.
            centred = isinstance(layer, LayerNorm) or (centred and isinstance(layer, (Gain, BlockGain)))
        self.centred = centred
        return form, lq, e

    def cross(self, lq_s, e_s, lq_b, e_b, q_y, kappa=0.0, rest=0.0, rho=0.0, row=None):
        """Covariance (relative to q_y) of the cross term 2 s.f of a merge; ``kappa``:
        n Cov[K_s,ij, K_f,ij] / (q_s q_f) between the operands' realised Gram entries in
        their pair mode, ``rest`` in their common and row modes, split between the two as
        Gaussian channels' of correlation ``rho`` are (2 rho^2 and 2 rho (1 - rho))
        (:func:`_merge_kappa`); ``row``: n Cov between the operands' own (a, m, u) (see
        _Walker.rowA), which gives the rows' and the diagonals' covariance instead."""
        b = self.b
        qs, qb = 2.0 ** (lq_s - math.log2(q_y)), 2.0 ** (lq_b - math.log2(q_y))
        # Exact for any exchangeable covariance, BatchNorm's negative correlation included.
        rs, rb = 1.0 - e_s, 1.0 - e_b
        a_s, g_s = qs * (1.0 - rs), qs * rs
        a_b, g_b = qb * (1.0 - rb), qb * rb
        m_s, m_b = g_s + a_s / b, g_b + a_b / b
        # The three parts are 4 tr(K_s K_f) / (n b^2), 4 (K_s 1).(K_f 1) / (n b^3) and
        # 4 (1'K_s 1)(1'K_f 1) / (n b^4) for the realised Grams: the mean Grams give the
        # first terms; their entries' covariance adds _gram_noise, as large as the rest
        # where b ~ n (measured: 1.5-1.9x at b = n otherwise). Each mode enters all three;
        # the channel variance reads only the pairs' and the centred diagonal's, whose
        # Gaussian share (2 kappa: tau - 4 C + 4 Vr = 2 Vp) is of order (1 - rho)^2.
        r = min(max(rho, 0.0), 1.0)
        if row is None:
            vr = 0.5 * rest * (1.0 - r)
            tau, c = 2.0 * kappa + 4.0 * vr, 2.0 * vr
        else:
            vr, tau, c = row[2, 2], row[0, 0], 0.5 * (row[0, 2] + row[2, 0])
        t = _gram_noise(b, rest * r, vr, kappa, tau, c, centred=min(rs, rb) < 0.0)
        k = qs * qb / self.n
        vy = 4.0 * ((a_s * a_b + a_s * g_b + g_s * a_b) / b + g_s * g_b + k * t[0])
        cyz = 4.0 * (m_s * m_b + k * t[1])
        vz = 4.0 * (m_s * m_b + k * t[2])
        L = _to_qc(b)
        return L @ (np.array([[vy, cyz], [cyz, vz]]) / self.n) @ L.T


@dataclass(frozen=True)
class Spread:
    """The predicted distribution of a single network's statistics, per position and
    quantity, in log2 units, as a log-normal: quantile p is median + Phi^-1(p) sigma.

    ``*_median`` hold the finite batch's own squared-mean floor, the 1/n mean correction and
    the log-normal's -sigma^2/2 below the mean; ``valid_*`` mark where the leading-order
    expansion holds (sigma of q, m and v below 0.5 nats; the gradient: below 0.5 nats).
    """

    skip_median: Stats
    skip_sigma: Stats
    branch_median: Stats
    branch_sigma: Stats
    grad_median: Stats
    grad_sigma: Stats
    width: int
    batch: Optional[int]
    valid_skip: np.ndarray
    valid_branch: np.ndarray
    valid_grad: np.ndarray

    _STATS = ("skip_median", "skip_sigma", "branch_median", "branch_sigma", "grad_median",
              "grad_sigma")
    _MASKS = ("valid_skip", "valid_branch", "valid_grad")

    def part(self, name):
        """(median, sigma) Stats of "skip", "branch" or "grad"."""
        return getattr(self, f"{name}_median"), getattr(self, f"{name}_sigma")

    def to_dict(self):
        from .profile import _stats_dict
        return {"width": self.width, "batch": self.batch,
                **{f: _stats_dict(getattr(self, f)) for f in self._STATS},
                **{f: [bool(v) for v in getattr(self, f)] for f in self._MASKS}}

    @classmethod
    def from_dict(cls, d):
        from .profile import _stats_from
        return cls(**{f: _stats_from(d[f]) for f in cls._STATS}, width=d["width"],
                   batch=d["batch"], **{f: np.array(d[f], dtype=bool) for f in cls._MASKS})


_INFINITE_BATCH = 2 ** 40  # the batch=None limit, numerically


def _report(form, cx, lq, e, b):
    """(median log2 q, m, v), (sigma log2 q, m, v) of a tensor with mean state (lq, e)."""
    rho = 1.0 - e
    P = form.cov(cx) if form is not None else np.zeros((2, 2))
    mu = form.mu if form is not None else np.zeros(2)
    fm = rho * (1.0 - 1.0 / b) + 1.0 / b       # m_b / q = rho + (1 - rho) / b
    fv = e * (1.0 - 1.0 / b)                   # v_b / q
    # Relative to q, a batch mean below 1e-9 is rounding: exactly zero (after BatchNorm and
    # linear maps), and so is a variance below that.
    zero_m, zero_v = fm < 1e-9, fv < 1e-9
    w = (np.array([1.0, 0.0]),
         np.array([1.0 / b, 1.0 - 1.0 / b]) / max(fm, 1e-9),
         np.array([1.0, -1.0]) / max(e, 1e-9))
    base = (lq, -math.inf if zero_m else lq + math.log2(fm),
            -math.inf if zero_v else lq + math.log2(fv))
    med, sig = [], []
    for k, wk in enumerate(w):
        if (k == 1 and zero_m) or (k == 2 and zero_v) or not np.isfinite(lq):
            med.append(base[k] if np.isfinite(lq) else -math.inf)
            sig.append(0.0)
            continue
        var = float(wk @ P @ wk)
        med.append(base[k] + (float(wk @ mu) - 0.5 * var) / LN2)
        sig.append(math.sqrt(max(var, 0.0)) / LN2)
    return med, sig


def spread(block, plan, q0, m0, width, batch=None, share=None, grad_log2=None, input_noise=True,
           _per_example=False, _inputs=None):
    """The :class:`Spread` of a scheme's block structure (``predict(..., width=n)``):
    ``share`` and ``grad_log2`` are the infinite-width profile's gradient branch shares and
    log2 G, which the backward spread is built on."""
    n = float(width)
    b = _INFINITE_BATCH if batch is None else int(batch)
    D, proj = plan.depth, plan.projection
    W = _Walker(n, b, D)
    lq, e = math.log2(q0), (q0 - m0) / q0
    # The input's channels are drawn from its population covariance (i.i.d. data), not
    # from a realised Gram: no n_in term.
    # Its (dq/q, dc/q, d mu): the third is the channel means' mean over the channels over
    # sqrt(q), m / (q n) in variance (each channel's realised batch mean, averaged).
    cx = np.zeros((3, 3))
    if input_noise:
        cx[:2, :2] = _noise(_grid(1.0 - e), b, "wishart") / n
        cx[2, 2] = (max(1.0 - e, 0.0) * (1.0 - 1.0 / b) + 1.0 / b) / n
    mux = np.zeros(2)
    sk_m, sk_s = np.full((3, D + 1), np.nan), np.full((3, D + 1), np.nan)
    br_m, br_s = np.full((3, D), np.nan), np.full((3, D), np.nan)
    lg_skip = 2.0 * math.log2(block.skip_gain) if block.skip_gain > 0 else -math.inf
    keep = np.zeros(D)  # the skip operand's share of each merge (0 for a projection)
    stream_centred = False
    # The block input's fluctuation over every independent source so far (not only through
    # the block-local "x"): the gradient's coupling to the forward pass needs the covariance
    # between different blocks' inputs, which persist along the stream.
    stream = _root(cx)
    coupling = []  # per block: d ln(backward gain) as a linear map of the sources
    kp_x = e * e if input_noise else 0.0  # the input's Gram: Gaussian channels, or exact
    sphere_x = 0.0  # data: no standardised rows drew them
    # and its inputs' own second moments and channel means (i.i.d. Gaussian channels).
    row_x = _row_gauss(max(1.0 - e, 0.0)) if input_noise else np.zeros((3, 3))
    for l in range(D):
        coupling.append(math.log(2.0) * np.append(_gain_slope(block, plan, l, lq, e, lg_skip), 0.0)
                        @ stream)
        x = _Form({"x": np.eye(2, 3)}, mux.copy())
        mu_x = _Form({"x": np.array([[0.0, 0.0, 1.0]])}, np.zeros(1))
        W.start_block()
        if _inputs is not None:  # each block input's (row covariance, fluctuation covariance, pair mode)
            _inputs.append((row_x.copy(), cx.copy(), kp_x))
        W.kp, W.row_x, W.rowA, W.rowF, W.muf = kp_x, row_x, np.eye(3), np.zeros((3, 3)), mu_x
        W.sphere = sphere_x
        p, lq_p, e_p = W.chain(block.pre, x, lq, e, l, cx, stream_centred, record=True)
        pre_centred, kp_p, row_p, mu_p, sphere_p = W.centred, W.kp, (W.rowA, W.rowF), W.muf, W.sphere
        f, lq_b, e_b = W.chain(block.branch, p, lq_p, e_p, l, cx, pre_centred, record=True)
        kp_f, row_f, mu_f, sphere_f = W.kp, (W.rowA, W.rowF), W.muf, W.sphere
        if proj[l]:
            W.kp, (W.rowA, W.rowF), W.muf, W.sphere = kp_p, row_p, mu_p, sphere_p
            s, lq_s, e_s = W.chain(block.projection, p, lq_p, e_p, l, cx, pre_centred)
            kp_s, row_s, mu_s, sphere_s = W.kp, (W.rowA, W.rowF), W.muf, W.sphere
        else:
            s, lq_s, e_s = x, lq + lg_skip, e
            kp_s, row_s, mu_s, sphere_s = kp_x, (np.eye(3), np.zeros((3, 3))), mu_x, sphere_x
        pair_sf, rest_sf, rho_sf = _merge_kappa(block, plan, l, lq, e, kp_p if proj[l] else kp_x)
        (sk_m[:, l], sk_s[:, l]) = _report(s, cx, lq_s, e_s, b)
        (br_m[:, l], br_s[:, l]) = _report(f, cx, lq_b, e_b, b)
        if f is None or lq_b == -math.inf:
            y, lq_y, e_y = s, lq_s, e_s
            kp_y, row_y, mu_y, sphere_y = kp_s, row_s, mu_s, sphere_s
        else:
            q_s, q_b = 2.0 ** lq_s, 2.0 ** lq_b
            lq_y = math.log2(q_s + q_b) if np.isfinite(lq_s) else lq_b
            ws = 2.0 ** (lq_s - lq_y) if np.isfinite(lq_s) else 0.0
            wb = 2.0 ** (lq_b - lq_y)
            e_y = ws * e_s + wb * e_b
            y = _Form.combine(s, ws, f, wb) if s is not None else f.map(wb * np.eye(2))
            if s is not None and np.isfinite(lq_s):
                # The operands' own deviations covary through the block input's (the
                # branch's fresh draws are its own; a projection's shared pre is left out).
                row_sf = row_s[0] @ row_x @ row_f[0].T
                y = y.add_noise(W.cross(lq_s - lq_y, e_s, lq_b - lq_y, e_b, 1.0, pair_sf, rest_sf, rho_sf,
                                        row_sf), W.fresh())
            # The sum's pair mode: both operands', their covariance, and the cross Gram
            # (1/n) sum_c (s_ic f_jc + f_ic s_jc), whose own pair part is 2 e_s e_b q_s q_f.
            kp_y = (ws * ws * kp_s + wb * wb * kp_f
                    + 2.0 * ws * wb * (pair_sf + e_s * e_b) if np.isfinite(lq_s) else kp_f)
            # Each input's own deviation: a_i mixes by the operands' shares of q, the channel
            # mean m_i (linear in the tensor) by their square roots; the cross term
            # 2 s_i.f_i / n rescales each input along itself by its own draw (the part
            # every input shares, rho_s rho_f, is c's).
            row_y = (_row_merge(row_s, ws, row_f, wb, e_s, e_b) if np.isfinite(lq_s)
                     else _row_merge(row_f, 1.0, row_f, 0.0, e_b, e_b))
            # The channel means add: their common part mixes by the square roots of q.
            mu_y = _Form.combine(mu_s, math.sqrt(ws), mu_f, math.sqrt(wb))
            # The fixed-norm rows' share mixes as the pair mode does (by the squared
            # shares): it is a property of each channel's draw, which a sum of two draws
            # averages away (a stream's channel means vary by its channels' own scales).
            sphere_y = ws * ws * sphere_s + wb * wb * sphere_f
            keep[l] = 0.0 if proj[l] else ws
        if l == D - 1:
            (sk_m[:, D], sk_s[:, D]) = _report(y, cx, lq_y, e_y, b)
        W.kp, (W.rowA, W.rowF), W.muf, W.sphere = kp_y, row_y, mu_y, sphere_y
        y, lq, e = W.chain(block.post, y, lq_y, e_y, l, cx)
        stream_centred, kp_x, mu_y, sphere_x = W.centred, W.kp, W.muf, W.sphere
        row_x = W.rowA @ row_x @ W.rowA.T + W.rowF
        if y is not None:
            stream, cx = _next_input(y, mu_y, stream, cx)
            mux = y.mu.copy()
        else:
            cx, mux = np.zeros((3, 3)), np.zeros(2)
    if _per_example:
        return W.ln_inputs
    if any(isinstance(layer, LayerNorm) for layer in block.pre + block.branch):
        # Backwards, LayerNorm divides each example by its own realised q_i and projects
        # out the example's mean and direction: E[q/q_i] (1 - 1/n)^-1 (1 - 2/n) =
        # 1 + Var[q_i]/q^2 - 1/n to first order. Var[q_i] is that of one example: the same
        # walk at batch 1.
        per_example = spread(block, plan, q0, m0, width, 1, _per_example=True)
        for l, variances in per_example.items():
            W.bn_shift[l] += sum(v - 1.0 / n for v in variances)
    # A first ReLU reads the stream's own signs unless a batch centring came first, or the
    # block's shortcut is a projection (the stream does not persist across it).
    rho_stream = np.where(proj, np.nan, W.first_relu_rho)
    own_w, kappa_g = _gradient_pair_walk(W.tape, share, keep, n)
    g_var = (_grad_variance(share, W.own + own_w, rho_stream, keep, proj, n, b, kappa_g)
             + _coupling_variance(coupling))
    s_arr = np.nan_to_num(np.asarray(share, dtype=np.float64)) if share is not None else np.zeros(D)
    g_shift = np.append(np.cumsum((s_arr * W.bn_shift)[::-1])[::-1], 0.0)
    skip_id = np.append(~proj & (block.skip_gain == 1.0), True)
    # G at a skip operand that is not the block input (projection, skip gain) is the merge
    # output's: blocks after l only.
    var_skip = np.where(skip_id, g_var, np.append(g_var[1:], 0.0))
    shift_skip = np.where(skip_id, g_shift, np.append(g_shift[1:], 0.0))
    g_sig = np.sqrt(var_skip) / LN2
    g_base = np.zeros(D + 1) if grad_log2 is None else np.asarray(grad_log2, dtype=np.float64)
    g_med = g_base + (shift_skip - 0.5 * var_skip) / LN2
    nan = np.full(D + 1, np.nan)
    valid_s = np.all(sk_s * LN2 < _VALID_SIGMA, axis=0) | np.isnan(sk_s).any(axis=0)
    valid_b = np.all(br_s * LN2 < _VALID_SIGMA, axis=0) | np.isnan(br_s).any(axis=0)
    # The finite-batch shift is derived to first order in 1/b; where it has grown past the
    # tolerance compare allows the median (0.1 nats), its own next order is not small.
    valid_g = (g_sig * LN2 < _VALID_SIGMA) & (shift_skip < _VALID_SHIFT)
    if any(layer.normalises for layer in block.post):
        # A normalisation on the stream divides every block's gradient by a realised norm;
        # E[1/q] > 1/E[q] then shifts the mean by O(depth / n), which this theory leaves out.
        valid_g[:] = False
    return Spread(skip_median=Stats(*sk_m), skip_sigma=Stats(*sk_s),
                  branch_median=Stats(*br_m), branch_sigma=Stats(*br_s),
                  grad_median=Stats(g_med, nan, nan), grad_sigma=Stats(g_sig, nan, nan),
                  width=int(width), batch=batch, valid_skip=valid_s, valid_branch=valid_b,
                  valid_grad=valid_g)


def _entry_factors(layers, lq, e, l):
    """How ``layers`` carry the covariance of a Gram entry with anything fixed upstream:
    (pair, rest) factors for the two kinds of off-diagonal fluctuation of K_ij.

    A realised Gram K_ij = (1/n) sum_c z_ic z_jc fluctuates in three ways: the common
    mode c (all pairs), a row mode per input (K_i. of one input), and each pair's own
    part. For Gaussian channels of correlation rho, n Var[K_ij] / q^2 = 1 + rho^2 splits
    into (1 - rho)^2 for the pair's own part and 2 rho for the other two. An elementwise
    map (a ReLU, a weight layer, a gain) takes every mode through the slope of its kernel,
    d rho_out / d rho_in at fixed q (a fresh weight layer adds noise independent of
    anything upstream, so covariances pass unchanged). BatchNorm centres each channel
    over the batch, which removes the common and row modes exactly (H K H), and divides
    by the variance: the pair part by e = 1 - rho relative to q. LayerNorm rescales each
    input by its own norm: relative entries pass."""
    fp = fr = 1.0
    for layer in layers:
        if isinstance(layer, Zero) or (isinstance(layer, Gain) and layer.a == 0.0):
            return 0.0, 0.0
        if isinstance(layer, BatchNorm):
            fp, fr = fp / max(e, 1e-12), 0.0
        elif not isinstance(layer, LayerNorm):
            h = 1e-6
            lo, hi = max(e - h, 0.0), min(e + h, 1.0)
            d = (layer.forward(lq, hi, l, MATH)[1] - layer.forward(lq, lo, l, MATH)[1]) / (hi - lo)
            fp, fr = fp * d, fr * d
        lq, e = layer.forward(lq, e, l, MATH)
    return fp, fr


@lru_cache(maxsize=4096)
def _relu_pair(rho):
    """(slope, pair) of a ReLU on Gaussian channels of correlation rho: slope
    d rho_out / d rho_in = 1/2 + asin(rho) / pi (Price: E[relu' relu'] relative to q_out / q_in),
    and the pair mode of its output Gram, n Var / q_out^2 = E_g[Var(relu | g)^2] / q_out^2
    (the pair mode of an exchangeable array X_ij is Var X_ij - 2 Cov[X_ij, X_ik] +
    Cov[X_ij, X_kl]; given the common factor g the channel's values are i.i.d.)."""
    rho = min(max(rho, 0.0), 1.0 - 1e-9)
    m1, m2 = _relu_powers(math.sqrt(rho) * _G, math.sqrt(1.0 - rho))[:2]
    pair = float(np.dot(_W, (m2 - m1 * m1) ** 2)) / 0.25  # q_out = 1/2 for q_in = 1
    return 0.5 + math.asin(rho) / math.pi, pair


def _pair_after(layer, kp, e, e_o):
    """The pair mode (n Var / q^2 of the Gram entries, double centred) of ``layer``'s
    output, from its input's ``kp`` at input / output states e, e_o (1 - rho).

    A ReLU maps the input's part through its slope d (the Gaussian linearisation is exact
    for covariances with the input's Gram) and adds its own residual, pair(rho) - d^2 e^2;
    Scaled WS then removes the channels' common mean, which is not in the pair mode but
    shrinks q by 1 - 1/pi; a fresh weight layer adds its Wishart draw, e_o^2; BatchNorm
    divides by the variance (q e); LayerNorm and gains keep relative entries."""
    if isinstance(layer, BatchNorm):
        return kp / max(e, 1e-12) ** 2
    if isinstance(layer, (Gain, BlockGain, LayerNorm)):
        return kp
    if isinstance(layer, _RELUS):
        d, pair = _relu_pair(_grid(1.0 - e))
        kp = d * d * kp + pair - d * d * e * e
        if isinstance(layer, ReLUScaledWS):
            kp = kp / (1.0 - 1.0 / math.pi) ** 2
    if layer.is_weight_layer:
        kp = kp + e_o * e_o
    return kp


def _row_gauss(rho):
    """n Cov of an input's own (a_i, m_i, u_i) (see _Walker.rowA) for Gaussian channels of
    correlation rho drawn afresh: a 2 (1 - rho^2), m 1 - rho, u rho (1 - rho), and
    Cov[a, u] = 2 rho (1 - rho) (the part of q_i along the batch mean)."""
    return np.array([[2.0 * (1.0 - rho * rho), 0.0, 2.0 * rho * (1.0 - rho)],
                     [0.0, 1.0 - rho, 0.0],
                     [2.0 * rho * (1.0 - rho), 0.0, rho * (1.0 - rho)]])


@lru_cache(maxsize=4096)
def _relu_row(rho):
    """How a ReLU on Gaussian channels of correlation rho maps each input's own deviation
    (a, m, u) (see _Walker.rowA): (B, R), its output's = B @ its input's + a fresh part of
    covariance R / n.

    Given the common factor g a channel's values are i.i.d., z = sqrt(rho) g + s e
    (s = sqrt(1 - rho)); an input's (a, m, u) and its output's are sums over channels of
    per-channel terms, a: 2 sqrt(rho) s g e + s^2 (e^2 - 1), m: s e, u: sqrt(rho) g s e, and
    for h = relu(z) (relu^2 - E)/p, (relu - E)/sqrt(p), (relu - E) E[relu | g]/p (p = q_out,
    the batch mean of channel c being E[relu | g_c]). B is the regression of the output's
    on the input's, R what is left: at rho = 0, a_out = a + 1.596 m + a rest of 0.454 / n
    (derivations/finite_width.py): shifting an input along the all-ones direction moves the
    ReLU's mass, 2 E[relu(z)] / q_out = 4 / sqrt(2 pi)."""
    rho = min(max(rho, 0.0), 1.0 - 1e-9)
    g = _G
    mu, s = math.sqrt(rho) * g, math.sqrt(1.0 - rho)
    M1, M2, M3, M4 = _relu_powers(mu, s)
    p = float(np.dot(_W, M2))
    # E[e relu^k | g] and E[(e^2 - 1) relu^k | g], k = 1, 2, from the truncated moments
    # (relu^k (z - mu) = relu^(k+1) - mu relu^k for k >= 1).
    Ms = {1: M1, 2: M2, 3: M3, 4: M4}

    def e1(k):
        return (Ms[k + 1] - mu * Ms[k]) / s

    def e2(k):
        return (Ms[k + 2] - 2.0 * mu * Ms[k + 1] + mu * mu * Ms[k]) / (s * s) - Ms[k]
    # Output terms Y_j = w_j (relu^k_j - M_k_j), with k_j = 2, 1, 1 and weights:
    ks = (2, 1, 1)
    ws = (np.full_like(g, 1.0 / p), np.full_like(g, 1.0 / math.sqrt(p)), M1 / p)
    sq = math.sqrt(rho) * s
    # The input's own covariance: Gaussian channels' (E_g g^2 = 1).
    cxx = _row_gauss(rho)
    cxy = np.zeros((3, 3))
    for j, (k, w) in enumerate(zip(ks, ws)):
        ey, eyy = e1(k), e2(k)
        cxy[0, j] = np.dot(_W, w * (2.0 * sq * g * ey + s * s * eyy))
        cxy[1, j] = np.dot(_W, w * s * ey)
        cxy[2, j] = np.dot(_W, w * sq * g * ey)
    cyy = np.zeros((3, 3))
    for i, (ki, wi) in enumerate(zip(ks, ws)):
        for j, (kj, wj) in enumerate(zip(ks, ws)):
            cyy[i, j] = np.dot(_W, wi * wj * (Ms[ki + kj] - Ms[ki] * Ms[kj]))
    B = cxy.T @ np.linalg.pinv(cxx, rcond=1e-10)
    R = cyy - B @ cxy
    return B, 0.5 * (R + R.T)


# Scaled WS reads each input's ReLU output less its own mean over the channels, h_i - h-bar_i:
# its second moment q_h (1 + a) - h-bar_i^2 and its projection on the batch mean lose
# 2 E[relu] and E[relu] times the own mean's deviation, m sqrt(q_h), relative to
# q_c = q_h (1 - 1/pi): a -> (pi a - 2 sqrt(pi) m) / (pi - 1), u -> (pi u - sqrt(pi) m) / (pi - 1)
# (derivations/finite_width.py, ``scaled_ws_row_mode``); its m is the weight layer's own.
_WS_ROW = np.array([[math.pi, -2.0 * math.sqrt(math.pi), 0.0],
                    [0.0, 0.0, 0.0],
                    [0.0, -math.sqrt(math.pi), math.pi]]) / (math.pi - 1.0)


def _row_after(layer, A, F, e, e_o):
    """Each input's own deviation (a_i, m_i, u_i) after ``layer`` (see _Walker.rowA): the
    map A from the block input's and the covariance F of the parts drawn since, at input /
    output states e, e_o (1 - rho).

    * BatchNorm reads each input's centred second moment, (q a - 2 q u) / v, and leaves a
      zero batch mean (u = 0); m is relative to sqrt(v). Gains keep all three.
    * LayerNorm divides each input by its own norm and centres it: a = m = 0, and the
      input's correlation with the batch mean loses its size's part, u - rho a / 2.
    * A ReLU maps them by the regression of _relu_row and adds its rest; Scaled WS then
      removes each input's own mean over the channels (_WS_ROW).
    * A fresh weight layer keeps a and u (its output's Gram is its input's in law) and
      adds its own draw over the channels (_row_gauss); its channel means are a fresh
      draw (the mean of its rows times each input)."""
    rho = max(1.0 - e, 0.0)
    if isinstance(layer, (Gain, BlockGain)):
        return A, F
    if isinstance(layer, LayerNorm):
        L = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.5 * rho, 0.0, 1.0]])
        return L @ A, L @ F @ L.T
    if isinstance(layer, BatchNorm):
        ee = max(e, 1e-12)
        L = np.array([[1.0 / ee, 0.0, -2.0 / ee], [0.0, 1.0 / math.sqrt(ee), 0.0], [0.0, 0.0, 0.0]])
        return L @ A, L @ F @ L.T
    if isinstance(layer, _RELUS):
        B, R = _relu_row(_grid(rho))
        A, F = B @ A, B @ F @ B.T + R
    if isinstance(layer, ReLUScaledWS):
        A, F = _WS_ROW @ A, _WS_ROW @ F @ _WS_ROW.T
    if layer.is_weight_layer:
        P = np.diag([1.0, 0.0, 1.0])
        A, F = P @ A, P @ F @ P.T + _row_gauss(max(1.0 - e_o, 0.0))
    return A, F


def _row_merge(row_s, ws, row_f, wb, e_s, e_b):
    """The merge's (A, F) (see _row_after) from its operands' at shares ws, wb of q: a and
    u mix by the shares, m (linear in the tensor) by their square roots; the cross term
    2 s.f / n adds, per input, 4 ws wb (1 - rho_s rho_f) to a (the part every input shares
    is c's), and the operands' batch means add k = (1 - rho_s) rho_f + rho_s (1 - rho_f) to
    u (and 2 k to its covariance with a), times ws wb."""
    (As, Fs), (Af, Ff) = row_s, row_f
    Ls = np.diag([ws, math.sqrt(ws), ws])
    Lf = np.diag([wb, math.sqrt(wb), wb])
    rs, rb = max(1.0 - e_s, 0.0), max(1.0 - e_b, 0.0)
    k = (1.0 - rs) * rb + rs * (1.0 - rb)
    cross = ws * wb * np.array([[4.0 * (1.0 - rs * rb), 0.0, 2.0 * k],
                                [0.0, 0.0, 0.0],
                                [2.0 * k, 0.0, k]])
    return Ls @ As + Lf @ Af, Ls @ Fs @ Ls.T + Lf @ Ff @ Lf.T + cross


def _row_shift(rho, tau, kp, n, floor=0.0):
    """The mean shift of a ReLU's output correlation, dc / q_out, from the realised Gram of
    its input: its inputs' own second moments spread by tau / n, and its correlations by
    V = (kp + (1 - rho)^2 (2 rho + rho^2)) / n (the pair mode and, Gaussian, the rows').

    With F(rho) the arc-cosine kernel (c_out / q_out), an input of relative size s_i enters
    c_out as sqrt(s_i s_j) F(rho_ij): E sqrt(s_i s_j) = 1 - tau / (4 n) at fixed rho_ij,
    while the mean Gram's rho (what the walk carries) moves by the same factor; and F'' /2 V.
    For Gaussian channels drawn from a fixed Gram (tau = 2 (1 - rho^2), kp = (1 - rho)^2)
    the two cancel exactly (derivations/finite_width.py): a draw's own noise leaves the
    ReLU's mean where it was. What is left is what the realised Gram carries beyond that:
    in a BatchNorm stream the inputs' sizes drift apart block by block (tau 2 -> 35 over
    100 blocks at width 256, measured), which lowers every later branch's channel mean."""
    rho = min(max(rho, 0.0), 1.0 - 1e-9)
    F = float(kernels.kappa(rho)) - floor      # ``floor``: a kernel F - floor (_ws_shift)
    F1 = 0.5 + math.asin(rho) / math.pi        # F' (Price's theorem; as _relu_pair)
    F2 = 1.0 / (math.pi * math.sqrt(1.0 - rho * rho))
    V = kp + (1.0 - rho) ** 2 * (2.0 * rho + rho * rho)
    return (-0.25 * tau * (F - rho * F1) + 0.5 * F2 * V) / n


def _ws_shift(rho, tau, kp, sphere, n):
    """The mean shift (dq, dc) / q_out of a ReLU + Scaled-WS layer from the realised Gram
    of its input and how that input was drawn (``sphere``: the share of it drawn through
    standardised rows).

    Zero-sum rows read each input's ReLU output less its own mean over the channels, and
    their norm, fixed in n - 1 dimensions, gives back the 1/n that mean's own variance
    takes: what is left is the kernel F - 1/pi (c less the product of two inputs' means,
    relative to q_out (1 - 1/pi)), with
    * the inputs' realised Gram beyond a draw (as _row_shift; for F - 1/pi a draw's own
      spread no longer cancels: floor (1 - rho^2) / 2 of it is taken off, so data drawn
      from a fixed covariance keep their mean), and
    * rows of a fixed norm before it: E[relu(w.x)] = sqrt(n) E[relu(g.x)] / E|g| is
      E[relu] (1 + 1/(4n)), while the same row's product keeps the Gaussian kernel exactly
      (degree two in |g|): q and c both lose E[relu]^2 / (2n), 1 / (2 pi n) of q_in.
    One ReLU + Scaled-WS layer at rho = 0 (n = b = 64 and 256): in rho, +0.23-0.25 / n after
    a Gaussian weight layer (predicted 0.234), 0.00 +- 0.01 after a Scaled-WS one (0.000),
    0.01 +- 0.01 on data (0.000); in q, +0.02 +- 0.04 / n after a Gaussian weight layer (0),
    -0.28 +- 0.04 / n after a Scaled-WS one (-0.234)."""
    floor = 1.0 / math.pi
    rho = min(max(rho, 0.0), 1.0 - 1e-9)
    draw = 0.5 * floor * (1.0 - rho * rho)
    own = 0.5 * floor * sphere
    dc = _row_shift(rho, tau, kp, 1.0, floor) - draw
    return np.array([-own, dc - own]) / (n * (1.0 - floor))


def _relu_shift_slope(layer, rho):
    """(dq, dc) / q_out of a ReLU layer's output per unit shift of every input along the
    all-ones direction (in units of sqrt(q_in)), at input correlation rho: the ReLU's mass
    moves by 2 E[relu(z)] = 2 / sqrt(2 pi) in q and by 2 E[relu(z_i) 1(z_j > 0)] =
    (1 + rho) / sqrt(2 pi) in c, relative to q_out = 1/2. A Scaled-WS layer removes each
    input's channel mean first (half the shift's mass, and E[relu]^2 of q): sqrt(2 pi) /
    (pi - 1) (1, rho)."""
    if isinstance(layer, ReLUScaledWS):
        return math.sqrt(2.0 * math.pi) / (math.pi - 1.0) * np.array([[1.0], [rho]])
    return 2.0 / math.sqrt(2.0 * math.pi) * np.array([[2.0], [1.0 + rho]])


def _next_input(y, mu_y, stream, cx):
    """The next block input's fluctuation (dq/q, dc/q, d mu) from the merge output's forms:
    over every source so far (``stream``, for the gradient's coupling) and as a covariance."""
    keys = [k for k in dict.fromkeys(list(y.cols) + list(mu_y.cols)) if k != "x"]

    def rows(k, d):
        a, m = y.cols.get(k), mu_y.cols.get(k)
        return np.vstack([a if a is not None else np.zeros((2, d)),
                          m if m is not None else np.zeros((1, d))])
    Mx = rows("x", 3)
    cols = [rows(k, 2) for k in keys]
    stream = np.hstack([Mx @ stream] + cols)
    new = Mx @ cx @ Mx.T
    for c in cols:
        new = new + c @ c.T
    return stream, new


def _merge_kappa(block, plan, l, lq, e, kp):
    """(pair, rest, rho) of n Cov[K_s,ij, K_f,ij] / (q_s q_f) between block l's skip operand
    and branch output, both drawn from the block input (lq, e) whose Gram's pair mode is
    ``kp`` (through the pre chain for a projection, whose output's is ``kp``): in the pair
    mode, and in the common and row modes, taken as Gaussian channels' of correlation rho
    (2 rho in all)."""
    pre_p, pre_r = _entry_factors(block.pre, lq, e, l)
    lq_p, e_p = run(block.pre, lq, e, l, MATH)
    bp, br = _entry_factors(block.branch, lq_p, e_p, l)
    if plan.projection[l]:
        sp, sr = _entry_factors(block.projection, lq_p, e_p, l)
        rho = max(1.0 - e_p, 0.0)
        return kp * sp * bp, 2.0 * rho * sr * br, rho
    rho = max(1.0 - e, 0.0)
    return kp * pre_p * bp, 2.0 * rho * pre_r * br, rho


def _root(cov):
    """A (2, 2) matrix R with R R^T = cov (cov symmetric positive semi-definite)."""
    w, V = np.linalg.eigh(0.5 * (cov + cov.T))
    return V * np.sqrt(np.clip(w, 0.0, None))


def _gain_slope(block, plan, l, lq, e, lg_skip):
    """The gradient of block l's log2 backward gain (merge output to block input, the
    ``a_l`` of ``predict``) with respect to its input's relative fluctuation (dq/q, dc/q).

    A branch that normalises what it reads (BatchNorm, LayerNorm on the stream) divides the
    gradient by the realised statistic of its input, not by its mean: a network whose
    stream came out 1% larger sends 1% less gradient through every such branch. The mean
    recursion's gain is a function of the input state (log2 q, e = 1 - rho), so its slope
    there is that coupling; with d log2 q = (dq/q) / ln 2 and de = (1 - e)(dq/q) - dc/q.
    Positively homogeneous branches (no normalisation) have slope 0."""
    def gain(lq_, e_):
        g_pre = backward_gain(block.pre, lq_, e_, l, MATH)
        lq_p, e_p = run(block.pre, lq_, e_, l, MATH)
        g_branch = backward_gain(block.branch, lq_p, e_p, l, MATH)
        if plan.projection[l]:
            g_proj = backward_gain(block.projection, lq_p, e_p, l, MATH)
            return g_pre + float(np.logaddexp2(g_branch, g_proj))
        return float(np.logaddexp2(lg_skip, g_pre + g_branch))

    h = 1e-5
    if not np.isfinite(lq):
        return np.zeros(2)
    with np.errstate(all="ignore"):
        d_lq = (gain(lq + h, e) - gain(lq - h, e)) / (2 * h)
        lo, hi = max(e - h, 0.0), min(e + h, 1.0)
        d_e = (gain(lq, hi) - gain(lq, lo)) / (hi - lo) if hi > lo else 0.0
    if not (np.isfinite(d_lq) and np.isfinite(d_e)):
        return np.zeros(2)  # a branch that reads a fully correlated batch through BatchNorm
    return np.array([d_lq / LN2 + d_e * (1.0 - e), -d_e])


def _coupling_variance(rows):
    """Var[ln G] at x_0 .. x_D from the forward-backward coupling: G at x_l carries
    sum_{j >= l} d ln a_j, and ``rows[j]`` is d ln a_j over the independent sources of the
    forward pass that reached block j (a prefix of every later block's)."""
    D = len(rows)
    out = np.zeros(D + 1)
    if not D:
        return out
    acc = np.zeros(max(len(r) for r in rows))
    for j in range(D - 1, -1, -1):
        acc[:len(rows[j])] += rows[j]
        out[j] = float(acc @ acc)
    return out


def _gradient_pair_walk(tape, share, keep, n):
    """The gradients' own Gram, walked backwards from the read-out: per block, the noise of
    its transposed weight layers, and the pair mode kappa_g of the gradient at each merge
    output (n Var / q^2 of its Gram's entries; 1 for the read-out's i.i.d. cotangents).

    |W^T g|^2 over b gradients has relative variance (2/n) tr(G^2) / tr(G)^2 =
    2/(n b) + 2 kappa_g / n^2 (gradients uncorrelated between inputs; a Monte Carlo at
    n = b = 64 gives 3.95, 8.3 and 17.1 in units of 1/(n b) for kappa_g = 1, 3, 7). The
    per-input 2/(n b) is counted in each ReLU's 5/b (its mask's 3/b and the Gaussian's 2/b),
    so a weight layer adds 2 kappa_g / n^2 (2/(n b) at b = n and kappa_g = 1, the old count).
    Backwards, a transposed weight adds its own draw (kappa + 1); a mask keeps entry (i, j)
    with probability P2 = 1/4 + asin(rho)/(2 pi) (rho: its forward inputs' correlation),
    so kappa -> d^2 kappa + 4 P2 (1 - P2) with d = 2 P2; normalisations and gains keep it.
    At a merge, g_x = g_y + J^T g_y: the two parts' pair modes, their covariance (g_y's,
    through the masks' slopes) and the cross Gram's own part 2 s (1 - s), weighted by the
    branch's share s of the gradient. A projection's own path is taken as the skip's."""
    D = len(tape)
    s = np.nan_to_num(np.asarray(share, dtype=np.float64)) if share is not None else np.zeros(D)
    own_w = np.zeros(D)
    kappa_y = np.ones(D)  # at each merge output
    kappa = 1.0
    for l in range(D - 1, -1, -1):
        kappa_y[l] = kappa
        k, slope = kappa, 1.0
        for item in reversed(tape[l]):
            if item[0] == "weight":
                own_w[l] += 2.0 * k / (n * n)
                k += 1.0
            else:
                p2 = 0.25 + math.asin(item[1]) / (2.0 * math.pi)
                d = 2.0 * p2
                k = d * d * k + 4.0 * p2 * (1.0 - p2)
                slope *= d
        sl = min(max(s[l], 0.0), 1.0)
        kappa = ((1.0 - sl) ** 2 * kappa + sl * sl * k
                 + 2.0 * sl * (1.0 - sl) * (kappa * slope + 1.0))
    return own_w, kappa_y


def _grad_variance(share, own, rho_stream, keep, proj, n, b, kappa_g=None):
    """Var[ln G] at x_0 .. x_D, accumulated from the read-out backwards.

    Block k passes the gradient G_{k+1} back as G_{k+1} (1 + chi_k): the branch carries the
    share s_k = chi_k / (1 + chi_k) and its gain fluctuates with relative variance ``own``
    (each ReLU's mask and Gaussian: (1/n)(5/b + (1 - 1/b)(2/pi) asin rho), rho the
    correlation between inputs of its pre-activation; each transposed weight layer
    2 kappa_g / n^2, :func:`_gradient_pair_walk`; each BatchNorm's division by a per-channel
    variance 2/(n(b-1))). The cross term of the merge, 2 tr(J G) / n for the branch's
    Jacobian J and the arriving gradients' channel Gram G (tr G = n), adds
    4 s (1 - s) tr(G^2) / n^3 = 4 s (1 - s) (1/(n b) + kappa_g / n^2): J's entries are
    independent with variance chi / n, and for b uncorrelated gradients tr(G^2) / n =
    n / b + kappa_g (kappa_g = 1 for Gaussian gradients). The 1/(n b) is each input's own
    g.J.g; the kappa_g / n^2 is tr(J) / n, which every input shares (it stays at an
    infinite batch).

    The masks of ReLUs that read the stream itself (``rho_stream`` finite: their input's
    correlation between inputs) persist from block to block: block k' reads
    x_k' = x_k + (branches in between), correlated per channel with x_k by
    r = prod sqrt(skip share) of the blocks between, so two such mask counts covary by
    (1/n)(2/pi)[asin(r)/b + (1 - 1/b) asin(rho_k r)] (a pair of inputs' signs).
    """
    D = len(own)
    s = np.nan_to_num(np.asarray(share, dtype=np.float64)) if share is not None else np.zeros(D)
    kg = np.ones(D) if kappa_g is None else np.asarray(kappa_g, dtype=np.float64)
    inc = s * s * own + 4.0 * s * (1.0 - s) * (1.0 / (n * b) + kg / (n * n))
    on_stream = np.isfinite(rho_stream) & (s > 0)
    # sqrt of the skip share between consecutive blocks: the stream's channel correlation.
    step = np.sqrt(np.clip(keep, 0.0, 1.0))
    cross = np.zeros(D)
    for k in np.flatnonzero(on_stream[:-1]):
        # r to every later block (up to the next projection, which restarts the stream).
        r = np.cumprod(step[k:D - 1])
        later = np.arange(k + 1, D)
        stop = np.flatnonzero(proj[later] | (r < 1e-6))
        upto = stop[0] if stop.size else len(later)
        r, later = r[:upto], later[:upto]
        use = on_stream[later]
        c = (2.0 / math.pi) * (np.arcsin(r[use]) / b + (1.0 - 1.0 / b)
                               * np.arcsin(np.minimum(rho_stream[k] * r[use], 1.0))) / n
        cross[k] = float(np.dot(s[later][use], c))
    return np.append(np.cumsum((inc + 2.0 * s * cross)[::-1])[::-1], 0.0)
