"""Finite-width spread of convolutional statistics, position by position.

A convolutional network's statistics average over examples *and* positions, and positions of
one example are correlated: a batch of N images on P positions is not N P independent
samples. The spread of one network of finite width around the position theory
(:mod:`propagation.positions`) is derived here from the same kernels, layer by layer.

The state of a tensor is its :class:`~propagation.positions.Population` (the mean kernel
over (example, position) pairs) and the fluctuation of its two statistics, (d ln q, d ln m),
as a linear form over independent unit Gaussian sources. The maps:

* **A convolution** draws its n output channels i.i.d. given its input: each channel is
  Gaussian over the samples with the output kernel K. For one channel, q_c = y'y / S and
  m_c = (1'y / S)^2 are quadratic forms of a Gaussian vector, so exactly
  ``Cov(y'Ay, y'By) = 2 tr(AKBK)``: relative variances 2 tr(K^2) / tr(K)^2 (twice the mean
  squared correlation between samples), 2 (a chi-square), covariance 2 |K1|^2 / (S q m S^2),
  each divided by n. Scaled WS draws each row on a sphere of the D = fan_in - 1 zero-mean
  directions instead: D / (D + 2) (C - 2 / D) for every relative covariance C
  (derivations/finite_width.py, ``sphere_quadratic_forms``). The input's fluctuation passes
  through the convolution's exact linear map, read in the family a K + c 11^T of kernels
  (a rescaling and a common offset: what (d ln q, d ln m) determine; for an input with a
  channel-mean function, a ReLU's output, the offset is that function's scale, which Scaled
  WS removes where every tap is in bounds).
* **The realised kernel's excess.** tr(K^2) above is the *realised* input's, not its mean:
  a Gram matrix over finitely many channels has entry noise, and a conv reading it gets
  2 nu_T more relative variance of q. The walk carries nu = E|K - E K|_F^2 / (S q)^2 per
  tensor, as Wishart noise with the kernel's own correlations: the network's input holds
  1 / C_in of it (an RGB batch: 1/3), a convolution passes (gain2 / T)^2 sum_{t, t'}
  wbar(t, t')^2 / q_out^2 of it (1 / T for a white input: ``_tap_transfer``) and adds 1 / n
  of its own, a ReLU keeps the share phi its slope carries and turns the rest of its
  channels' own 1 / n into its own (``_excess_share``). One Scaled-WS conv reading a
  ReLU of the stem (8 images of 3 x 16 x 16, width 32): nu_T = 0.0137 measured from the
  realised patches, against the mean kernel's 0.0007; its q's spread is 0.0235 nats over
  300 draws of the conv, 0.0251 by the realised patches' formula (on a ReLU of i.i.d.
  inputs, without the stem's structure: 0.0064 and 0.0067).
* **A ReLU** of Gaussian channels has its own noise: the joint covariance of the input's
  (q, m) and the output's (q, m) per channel is a sum over sample pairs of bivariate
  Gaussian moments (the arc-cosine kernels of degree 1 and 2, the mixed one
  E[relu(x) relu(y)^2] = sd_x sd_y^2 (1 + r)^2 / (2 sqrt(2 pi)): ``relu_pair_moments``, and
  Stein's lemma for the input's moments against the output's); what is not linear in the
  input's (q, m) is the ReLU's own noise, and the input's fluctuation passes through the
  ReLU's slope in the same family (``relu_offset_slope``). The output's squared mean is
  linearised around the ReLU mean: low where the input's channel mean is a large share of
  its second moment (``_relu_pass``).
* **BatchNorm** fixes each channel's mean and variance over the batch and positions: its
  output's q and m carry no fluctuation (the next ReLU's own noise is then that of a
  Gaussian channel given its exact sample mean and variance: the regression above).
  **GroupNorm(1, C)** (the conv nets' LayerNorm) passes the input's fluctuation through its
  slope and fixes q.
* **A residual merge** adds the operands' fluctuations, weighted by their shares of q and
  of m, and the cross term 2 s.b / (n S): given the skip operand the branch's channels are
  zero-mean, so it has variance 4 tr(K_s K_b) / (n S^2) on q and 4 m_s m_b / n on m.

Where it stops, it says so (NaN sigma: ``compare`` keeps its band there):
* the channel variance q - m is not predicted: it reads the double-centred kernel, whose
  spread lives in the kernel's shape over positions, which the walk does not carry;
* downstream of a convolution whose spread came mostly from the excess (2 nu_T above the
  mean kernel's share: Scaled WS after a ReLU, a conv reading BatchNorm's output), the
  spread is marked invalid: there the excess's Wishart form is only the leading picture
  (NF's and ReLU-BN-Conv's spreads of q stayed too narrow with it: 47-58% and 69-87%
  coverage of the 90% band);
* gradients keep the band of :func:`propagation.comparison.grad_sigma`.
What else this leaves out: each example's own deviation (the MLP theory's row mode), and the
1/n shift of the mean (the median is the log-normal's, sigma^2 / 2 below the mean).
``make calibrate`` measures the coverage this gives on the gate's conv nets.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

LN2 = math.log(2.0)
_SQ2PI = math.sqrt(2.0 * math.pi)
#: Above this sigma (nats) the log-normal, leading-order picture is indicative only (as for
#: the MLP theory, propagation.finite): compare then keeps its older band.
VALID_SIGMA = 0.5


class _Form:
    """(d ln q, d ln m) of a tensor as a linear map over independent unit sources, and the
    tensor's channel count ``n`` (None where no convolution has set it yet)."""

    def __init__(self, cols: Optional[Dict[int, np.ndarray]] = None, n: Optional[int] = None,
                 nu: float = 0.0, excess_led: bool = False):
        self.cols: Dict[int, np.ndarray] = {} if cols is None else cols
        self.n = n
        self.nu = nu  # the realised kernel's excess (module docstring)
        # Whether a convolution on this tensor's path drew most of its spread from the excess,
        # whose Wishart form is only the leading picture there (module docstring).
        self.excess_led = excess_led

    def map(self, J) -> "_Form":
        return _Form({k: J @ v for k, v in self.cols.items()}, self.n, self.nu, self.excess_led)

    def cov(self) -> np.ndarray:
        out = np.zeros((2, 2))
        for v in self.cols.values():
            out += np.outer(v, v)
        return out


def _rows(pop):
    """The full kernel's row sums, K 1, per position (the same for every example)."""
    return pop.W.sum(axis=1) + (pop.batch - 1) * pop.X.sum(axis=1)


def _sums(pop):
    """(S, sum of squared kernel entries over sample pairs, row sums r (P,))."""
    n = pop.batch
    S = n * pop.W.shape[0]
    sq = n * float(np.sum(pop.W * pop.W)) + n * (n - 1) * float(np.sum(pop.X * pop.X))
    return S, sq, _rows(pop)


def _log_rows(q, m):
    """Whether ln q and ln m of a state are defined (a zero statistic has no fluctuation)."""
    return q > 1e-300, m > 1e-12 * max(q, 1e-300)


def _gaussian_cov(pop):
    """Per-channel relative covariance of (q, m) of Gaussian channels with kernel ``pop``."""
    S, sq, r = _sums(pop)
    q, m = pop.q, pop.m
    ok_q, ok_m = _log_rows(q, m)
    C = np.zeros((2, 2))
    if ok_q:
        C[0, 0] = 2.0 * sq / (S * S * q * q)
    if ok_m:
        C[1, 1] = 2.0
        if ok_q:
            C[0, 1] = C[1, 0] = 2.0 * pop.batch * float(r @ r) / (S ** 3 * q * m)
    return C


def _relu_pass(pop):
    """One pass over a ReLU input's sample pairs, for zero-mean Gaussian channels with
    kernel ``pop`` (module docstring): (the per-channel relative covariance of (q_in, m_in,
    q_out, m_out), the excess slope sum of :func:`_excess_share`, d q_out / dc and
    d m_out / dc for a common offset c 11^T of the input)."""
    n, p = pop.batch, pop.W.shape[0]
    S = n * p
    sd = np.sqrt(np.maximum(np.diag(pop.W), 0.0))
    inv_sd = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    e1, e2 = sd / _SQ2PI, sd * sd / 2.0
    dd = np.outer(sd, sd)
    ratio = np.outer(sd, inv_sd)
    ratio = ratio + ratio.T  # sd_a / sd_b + sd_b / sd_a
    # var q_out, var ybar, cov(ybar, q_out), cov(q_in, q_out), cov(q_in, ybar), sum K^2,
    # excess slope, d K_out / dc summed
    acc = np.zeros(8)
    dc_w = 0.0
    dd2 = dd * dd
    dds = dd * sd[None, :]
    sum_e1, sum_e2 = float(e1.sum()), float(e2.sum())
    two_pi = 2.0 * math.pi
    for B, w in ((pop.W, n), (pop.X, n * (n - 1))):
        if w == 0:
            continue
        # Every sum below is a dot product over the pairs, on as few (P, P) temporaries as
        # the kernels allow (they are large: every pass over them counts).
        r = np.divide(B, dd, out=np.zeros_like(B), where=dd > 0)
        np.clip(r, -1.0, 1.0, out=r)
        r2 = r * r
        s = np.sqrt(np.maximum(1.0 - r2, 0.0))
        pt = np.arccos(r)
        np.subtract(math.pi, pt, out=pt)            # pi - theta
        k11 = s + pt * r                            # kappa_1 2 pi
        k22 = 3.0 * s * r
        k22 += pt * (1.0 + 2.0 * r2)                # kappa_22 2 pi
        one_r = 1.0 + r
        one_r *= one_r                              # (1 + r)^2 = kappa_12 2 sqrt(2 pi)
        slope_dd = pt * dd                          # slope dd 2 pi
        B2 = B * B
        dK = s * ratio
        dK *= 0.5
        dK += pt                                    # d K_out / dc 2 pi
        acc += w * np.array([
            np.vdot(dd2, k22) / two_pi - sum_e2 ** 2,
            np.vdot(dd, k11) / two_pi - sum_e1 ** 2,
            np.vdot(dds, one_r) / (2.0 * _SQ2PI) - sum_e1 * sum_e2,
            float(B2.sum()),
            float(np.dot(B2.sum(axis=0), inv_sd)) / _SQ2PI,
            float(B2.sum()),
            np.vdot(slope_dd, slope_dd) / two_pi ** 2,
            float(dK.sum()) / two_pi])
        if w == n:
            dc_w = float(np.mean(np.diag(dK))) / two_pi
    pair_sums = acc / (S * S)
    rows = _rows(pop)
    var_qo, var_y, c_yqo, c_qiqo, c_qiy, sq, slope_sum, dk_mean = pair_sums
    c_miqo = n * float(rows @ rows) / S ** 3
    c_miy = n * float(rows @ (rows * inv_sd)) / (_SQ2PI * S ** 3)
    var_qi = 2.0 * sq
    var_mi = 2.0 * (n * float(rows.sum())) ** 2 / S ** 4
    c_qimi = 2.0 * n * float(rows @ rows) / S ** 3
    q_in, m_in = pop.q, pop.m
    q_out = float(e2.mean())
    ybar = float(e1.mean())
    m_out = ybar * ybar + var_y
    # m_out = ybar^2 = mu^2 + 2 mu d + d^2 with d = ybar - mu, linearised: its covariances
    # are 2 mu those of d, and its variance adds d^2's own 2 var^2 (d Gaussian). Where the
    # input's channel mean is a large share of its q (m / q ~ 0.3, a conv of a ReLU output),
    # d is skewed and not linear in the input: at m / q = 0.27 Monte Carlo gives Var[ln m_out]
    # 1.99 against 1.10 here and its covariances with the input's q and m 2.7-2.8x these
    # (tests/test_finite_positions.py checks the rest there). Adding the quadratic part's
    # covariances alone (xbar^2 / 4) narrowed the conv nets' squared-mean bands below
    # coverage (none: 88% -> 83%): the second order is all or nothing, and is not derived.
    g = 2.0 * ybar
    cov = np.array([
        [var_qi, c_qimi, c_qiqo, g * c_qiy],
        [c_qimi, var_mi, c_miqo, g * c_miy],
        [c_qiqo, c_miqo, var_qo, g * c_yqo],
        [g * c_qiy, g * c_miy, g * c_yqo, g * g * var_y + 2.0 * var_y * var_y]])
    scale = np.array([q_in, m_in, q_out, m_out])
    ok = scale > 1e-12 * max(q_in, 1e-300)
    inv = np.where(ok, 1.0 / np.where(ok, scale, 1.0), 0.0)
    # The diagonal's derivative is dc_w per position (1/2 on the diagonal itself: theta = 0);
    # the squared mean is the mean of every pair's.
    return cov * np.outer(inv, inv), slope_sum, dc_w, dk_mean


def _excess_share(slope_sum, s_out):
    """The share phi of a ReLU input's realised-kernel excess its centred output holds: the
    arc-cosine kernel's slope (pi - theta) / (2 pi) squared over the sample pairs
    (``slope_sum``), relative to the output's centred second moment. The rest of the
    channels' own noise, (1 - phi) / n, is the ReLU's."""
    _, qc = _centred(s_out)
    return min(slope_sum / (qc * qc), 1.0) if qc > 0 else 0.0


def _offset_jacobian(pop, out, dq_dc, dm_dc):
    """The (ln q, ln m) Jacobian of a positively homogeneous map (a ReLU, a convolution) in
    the family a K + c 11^T, from its output's derivatives in c."""
    qo, mo = out.q, out.m
    ok_q, ok_m = _log_rows(qo, mo)
    J_ac = np.array([[1.0 if ok_q else 0.0, dq_dc / qo if ok_q else 0.0],
                     [1.0 if ok_m else 0.0, dm_dc / mo if ok_m else 0.0]])
    q0, m0 = pop.q, pop.m
    M = np.array([[q0, 1.0], [m0, 1.0]])
    return J_ac @ np.linalg.pinv(M) @ np.diag([q0, m0])


def _directions(pop, h):
    """The two perturbed inputs the Jacobians are read on, and the (dq, dm) each makes: a
    rescaling a K, and the channel means' common part. Where the input has a channel-mean
    function mu (a ReLU's output), its squared mean moves as mu does (the mean over channels
    of the channel means): mu -> (1 + h) mu, K -> K + 2 h mu mu^T, which Scaled WS removes
    where every tap is in bounds. Elsewhere a common offset c 11^T."""
    from .positions import Population
    up = Population((1.0 + h) * pop.W, (1.0 + h) * pop.X, math.sqrt(1.0 + h) * pop.mu,
                    pop.shape, pop.batch)
    d_up = (h * pop.q, h * pop.m)
    if np.any(pop.mu != 0.0):
        mm = 2.0 * h * np.outer(pop.mu, pop.mu)
        other = Population(pop.W + mm, pop.X + mm, (1.0 + h) * pop.mu, pop.shape, pop.batch)
        d_other = (2.0 * h * float(np.mean(pop.mu ** 2)), 2.0 * h * float(np.mean(pop.mu)) ** 2)
    else:
        c = -h * pop.q  # one step down: a common offset only adds correlation
        other = Population(pop.W + c, pop.X + c, pop.mu, pop.shape, pop.batch)
        d_other = (c, c)
    return (up, d_up), (other, d_other)


def _family(fwd, pop, out0, homogeneous, h=1e-5):
    """The 2 x 2 Jacobian of an op's (ln q, ln m) with respect to its input's (ln q, ln m),
    by forward differences along :func:`_directions`; ``homogeneous`` ops (convolutions,
    ReLUs) scale both statistics with the input's scale exactly."""
    qo, mo = out0.q, out0.m
    ok_q, ok_m = _log_rows(qo, mo)
    ok = np.array([1.0 if ok_q else 0.0, 1.0 if ok_m else 0.0])

    def rel(o):
        return np.array([(o.q - qo) / qo if ok_q else 0.0, (o.m - mo) / mo if ok_m else 0.0])

    (up, d_up), (other, d_other) = _directions(pop, h)
    col_up = ok.copy() if homogeneous else rel(fwd(up)[0]) / h
    col_other = rel(fwd(other)[0])
    # (d ln q_in, d ln m_in) per unit step of each direction.
    M = np.array([[d_up[0] / (h * pop.q), d_other[0] / pop.q],
                  [d_up[1] / (h * pop.m) if pop.m > 0 else 0.0,
                   d_other[1] / pop.m if pop.m > 0 else 0.0]])
    return np.stack([col_up, col_other], axis=1) @ np.linalg.pinv(M)


class PositionSpread:
    """Walks the position theory's ops, carrying each tensor's fluctuation form."""

    def __init__(self, width: Optional[int]):
        self.width = width
        self._k = 0

    def _fresh(self, cov) -> Dict[int, np.ndarray]:
        w, V = np.linalg.eigh(0.5 * (cov + cov.T))
        cols = {}
        for i in range(2):
            if w[i] > 0.0:
                cols[self._k] = V[:, i] * math.sqrt(w[i])
                self._k += 1
        return cols

    def _add(self, form: _Form, cov) -> _Form:
        cols = dict(form.cols)
        cols.update(self._fresh(cov))
        return _Form(cols, form.n, form.nu, form.excess_led)

    def _channels(self, n):
        n = self.width if n is None else n
        if n is None:
            raise ValueError("the finite-width spread needs each convolution's channels: the "
                             "geometry has none, pass width=<channels>")
        return int(n)

    def op(self, name, info, fwd, s_in, s_out, form: _Form) -> _Form:
        if name == "scale":
            return form
        if name == "zero":
            return _Form({}, form.n)
        if name == "batchnorm":
            return _Form({}, form.n, form.nu, form.excess_led)
        if name == "groupnorm":
            # Each example's second moment is fixed (to 1): q carries no fluctuation.
            J = _family(fwd, s_in, s_out, homogeneous=False)
            J[0, :] = 0.0
            return form.map(J)
        if name == "relu":
            n = self._channels(form.n)
            C, slope_sum, dq_dc, dm_dc = _relu_pass(s_in)
            pre, post = C[:2, :2], C[2:, 2:]
            cross = C[2:, :2]
            residual = post - cross @ np.linalg.pinv(pre) @ cross.T
            J = _offset_jacobian(s_in, s_out, dq_dc, dm_dc)
            out = self._add(form.map(J), residual / n)
            phi = _excess_share(slope_sum, s_out)
            out.nu = phi * form.nu + (1.0 - phi) / n
            return out
        if name == "conv":
            spec = info["spec"]
            chans = spec.get("channels")
            n_out = self._channels(None if chans is None else chans[1])
            J = _conv_jacobian(s_in, s_out, spec, info["gain2"], bool(info.get("standardised")))
            C = _gaussian_cov(s_out)
            # The input's realised kernel is not its mean: its excess, read through the taps,
            # adds to the output's squared entries (2 nu_T to q's relative variance).
            nu_t = form.nu * _tap_transfer(s_in, s_out, spec, info["gain2"])
            led = form.excess_led or 2.0 * nu_t > C[0, 0]
            C[0, 0] += 2.0 * nu_t if C[0, 0] > 0 else 0.0
            if info.get("standardised") and chans is not None:
                D = int(chans[0]) * int(np.prod(spec["kernel"])) - 1
                ok = np.diag(C) > 0
                C = np.where(np.outer(ok, ok), D / (D + 2.0) * (C - 2.0 / D), 0.0)
            out = form.map(J)
            out.n = n_out
            out.nu = nu_t + 1.0 / n_out
            out.excess_led = led
            return self._add(out, C / n_out)
        raise NotImplementedError(f"the op {name!r} has no finite-width map")

    def merge(self, s, fs: _Form, b, fb: _Form, y) -> _Form:
        """y = s + b, b's last weights independent of s."""
        n = self._channels(fb.n if fb.n is not None else fs.n)
        qs, qb, qy = s.q, b.q, y.q
        ms, mb, my = s.m, b.m, y.m
        ok_q, ok_m = _log_rows(qy, my)
        ws = np.diag([qs / qy if ok_q else 0.0, ms / my if ok_m else 0.0])
        wb = np.diag([qb / qy if ok_q else 0.0, mb / my if ok_m else 0.0])
        cols = {k: ws @ v for k, v in fs.cols.items()}
        for k, v in fb.cols.items():
            cols[k] = cols.get(k, 0.0) + wb @ v
        N = s.batch
        S = N * s.W.shape[0]
        tr = N * float(np.sum(s.W * b.W)) + N * (N - 1) * float(np.sum(s.X * b.X))
        rs, rb = _rows(s), _rows(b)
        C = np.zeros((2, 2))
        if ok_q:
            C[0, 0] = 4.0 * tr / (n * S * S * qy * qy)
        if ok_m:
            C[1, 1] = 4.0 * ms * mb / (n * my * my)
            if ok_q:
                C[0, 1] = C[1, 0] = 4.0 * N * float(rs @ rb) / (n * S ** 3 * qy * my)
        nu = ((qs * qs * fs.nu + qb * qb * fb.nu) / (qy * qy)
              + 2.0 * qs * qb / (n * qy * qy) if ok_q else 0.0)
        return self._add(_Form(cols, n, nu, fs.excess_led or fb.excess_led), C)


def _conv_jacobian(s_in, s_out, spec, gain2, standardised):
    """A convolution's (ln q, ln m) Jacobian, in closed form. It is linear in its input's
    kernel and positively homogeneous (the rescaling column is 1). With c = gain2 / T and
    S_t v the input vector v read at tap t (zero out of bounds), a direction v v^T of the
    input's kernel moves the output by c sum_t (S_t v)(S_t v)^T, whose q and m are means over
    positions:
    * an input with a channel-mean function mu (a ReLU's output): the offset is mu's scale,
      mu -> (1 + h) mu with K -> K + 2 h mu mu^T, and Scaled WS also removes
      (c / T) leak leak^T (leak = sum_t S_t mu, its border leak);
    * otherwise a common offset c 11^T (v = 1: the in-bounds taps), which Scaled WS keeps
      (a per-channel offset has no common part over the fan-in)."""
    from .positions import _conv_args, tap_index
    _, index = tap_index(s_in.shape, **_conv_args(spec))
    T = len(index)
    c = gain2 / T
    has_mu = bool(np.any(s_in.mu != 0.0))
    v = np.append(s_in.mu if has_mu else np.ones(s_in.W.shape[0]), 0.0)
    taps = np.stack([v[i] for i in index])               # (T, P_out): S_t v
    dq = c * float(np.sum(np.mean(taps ** 2, axis=1)))
    dm = c * float(np.sum(np.mean(taps, axis=1) ** 2))
    if not has_mu:
        return _offset_jacobian(s_in, s_out, dq, dm)
    if standardised:
        leak = taps.sum(axis=0)
        dq -= c / T * float(np.mean(leak ** 2))
        dm -= c / T * float(np.mean(leak)) ** 2
    qo, mo = s_out.q, s_out.m
    ok_q, ok_m = _log_rows(qo, mo)
    J_par = np.array([[1.0 if ok_q else 0.0, 2.0 * dq / qo if ok_q else 0.0],
                      [1.0 if ok_m else 0.0, 2.0 * dm / mo if ok_m else 0.0]])
    q0, m0 = s_in.q, s_in.m
    # (d ln q_in, d ln m_in) per unit of each parameter: the rescaling (1, 1); mu's scale
    # (2 mean mu^2 / q, 2 mean(mu)^2 / m), as _directions.
    M = np.array([[1.0, 2.0 * float(np.mean(s_in.mu ** 2)) / q0],
                  [1.0, 2.0 * float(np.mean(s_in.mu)) ** 2 / m0 if m0 > 0 else 0.0]])
    return J_par @ np.linalg.pinv(M)


def _centred(pop):
    """The kernel less the channel-mean function's outer product (W, q)."""
    mm = np.outer(pop.mu, pop.mu)
    W = pop.W - mm
    return W, float(np.mean(np.diag(W)))


def _tap_transfer(s_in, s_out, spec, gain2):
    """How much of the input's realised-kernel excess (relative to its centred second
    moment) a convolution's output kernel holds, relative to the output's q: for an excess
    of Wishart form, Cov(dK_ac, dK_bd) = nu K_ab K_cd, the output's is
    (gain2 / T)^2 sum_{t, t'} wbar(t, t')^2 / q_out^2 nu, wbar(t, t') the mean over output
    positions of the centred kernel between the two taps' input positions (zero out of
    bounds)."""
    from .positions import _conv_args, tap_index
    W, qc = _centred(s_in)
    qo = s_out.q
    if qc <= 0.0 or qo <= 0.0:
        return 0.0
    _, index = tap_index(s_in.shape, **_conv_args(spec))
    p = W.shape[0]
    Wp = np.zeros((p + 1, p + 1))
    Wp[:p, :p] = W
    T = len(index)
    total = 0.0
    for i in index:
        for j in index:
            total += float(np.mean(Wp[i, j])) ** 2
    return (gain2 / T) ** 2 * total / (qo * qo)


def report(pop, form: _Form):
    """(median log2 (q, m, v), sigma log2 (q, m, v)) of a tensor: log-normal around the mean.
    The channel variance q - m is not predicted (NaN): its spread lives in the kernel's shape
    over positions (module docstring), so compare keeps its band there; nor is anything on
    a path led by the excess."""
    med, sig = [], []
    for mean, w in ((pop.q, np.array([1.0, 0.0])), (pop.m, np.array([0.0, 1.0]))):
        lm = math.log2(mean) if mean > 0 else -math.inf
        if form.excess_led:
            med.append(lm)
            sig.append(math.nan)
            continue
        var = float(w @ form.cov() @ w)
        med.append(lm - 0.5 * var / LN2 if np.isfinite(lm) else lm)
        sig.append(math.sqrt(max(var, 0.0)) / LN2)
    return med + [math.nan], sig + [math.nan]


def build_spread(skip_reports: List, branch_reports: List, grad_log2, width, batch):
    """A :class:`propagation.finite.Spread` from the walk's reports; gradients invalid
    (compare keeps its band there)."""
    from .finite import Spread
    from .profile import Stats

    def stats(rows, k):
        a = np.array([r[k] for r in rows], dtype=np.float64)
        return Stats(a[:, 0], a[:, 1], a[:, 2])

    def valid(rows):
        # NaN (a path led by the excess) compares False: invalid.
        return np.array([bool(max(r[1][:2]) * LN2 < VALID_SIGMA) for r in rows], dtype=bool)

    g = np.asarray(grad_log2, dtype=np.float64)
    nan = np.full_like(g, np.nan)
    return Spread(skip_median=stats(skip_reports, 0), skip_sigma=stats(skip_reports, 1),
                  branch_median=stats(branch_reports, 0), branch_sigma=stats(branch_reports, 1),
                  grad_median=Stats(g, nan, nan), grad_sigma=Stats(np.zeros_like(g), nan, nan),
                  width=int(width) if width is not None else 0, batch=int(batch),
                  valid_skip=valid(skip_reports), valid_branch=valid(branch_reports),
                  valid_grad=np.zeros(len(g), dtype=bool))
