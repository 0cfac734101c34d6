"""Transformers at initialisation: the token axis and attention in the theory.

The residual-stream argument of De & Smith carries over to transformers: a pre-LN stream
grows linearly with depth like a BatchNorm ResNet's, so each branch is downscaled by about
sqrt(depth); post-LN renormalises after every merge and does not; ReZero, LayerScale,
DeepNorm, depth-muP and CompleteP are choices of the branch multiplier alpha (and DeepNorm
of a skip gain). This module is their infinite-width theory.

State
-----
A sequence model's activation ``x[b, t, c]`` (example, token, channel) is described, at
infinite width, by two T x T kernels of its tokens:

* ``K[t, u] = E[x_bt . x_bu] / n``: tokens of one sequence (the within-sequence kernel);
* ``C[t, u] = E[x_at . x_bu] / n`` for two different sequences a != b (the cross kernel).

The profile's quantities are read from them: second moment ``q = mean_t K[t, t]``, squared
channel mean over tokens and examples ``m = mean_tu C[t, u]`` (infinite batch; ``compare``
adds the finite batch's share of the within-sequence mean), variance ``q - m``, and the
token correlation, the mean cosine between two different tokens of one sequence,
``mean_{t != u} K[t, u] / sqrt(K[t, t] K[u, u])`` (at infinite width a cosine is the kernel's
correlation). Rank collapse is that correlation going to 1. Gradients carry a T x T kernel
``G`` of their own; a random read-out independent per token starts it at the identity.

Layers
------
LayerNorm (over channels, per token) divides each token by its root second moment; a ReLU
maps every pair of tokens through the arc-cosine kernel; a weight layer with variance
``gain2 / fan_in`` multiplies the kernels by gain2; a scalar alpha by alpha^2.

Attention
---------
Softmax attention ``out_t = sum_s A_ts W_V x_s`` (then W_O) with logits
``l_ts = (W_Q x_t) . (W_K x_s) / sqrt(d_head)``. With query and key weights of variance
``sqrt(g) / fan_in`` each, the logits are Gaussian with covariance
``E[l_ts l_uv] = g K[t, u] K[s, v]`` (``g = s^2``, the logit variance of unit-norm tokens).
Given the logits, the value weights are independent, so ``E[out . out] = E[A K A^T]``
exactly; the theory expands the softmax to second order in the logits around the uniform
average ``P`` (``P_ts = 1 / T``, or ``1 / (t + 1)`` over the prefix with a causal mask):

    A_ts = P_ts (1 + d_ts + d_ts^2 / 2 - sum_v P_tv d_tv^2 / 2),   d_ts = l_ts - sum_v P_tv l_tv,

so that ``E[A_ts A_uv] = P_ts P_uv (1 + E[d_ts d_uv] + H_ts + H_uv)`` with
``H_ts = (D_ts - sum_v P_tv D_tv) / 2``, ``D_ts = E[d_ts^2]`` and

    E[d_ts d_uv] = g K[t, u] (K[s, v] - (K P^T)[s, u] - (P K)[t, v] + (P K P^T)[t, u]).

At g = 0 the branch is exactly the (prefix) mean of the tokens: it feeds only the token
mean, ``m_(l+1) = m_l + alpha^2 cbar_l``, and pulls every token towards it. The g terms are
the first correction; for exchangeable tokens they add ``g q (q - k)^2 (T - 1) / T^2`` to
the branch's second moment (k the token covariance; derivations/attention.py), against
``(e^(g q (q - k)) - 1) (q - k) / T`` of independent log-normal weights at large T: the
expansion holds while the effective logit variance ``x = g q (q - k)`` is small
(``MAX_LOGIT_VARIANCE``; :func:`predict_sequence` warns above it).

Backwards, the value path carries ``E[A^T G A]``, and the logits carry the gradient to
queries and keys (``Attention.backward``, first order in g):
``G_Q[t, u] = g G[t, u] sum_sv P_ts P_uv M[t, s, u, v] K[s, v]`` and
``G_K[s, v] = g sum_tu P_ts P_uv M[t, s, u, v] G[t, u] K[t, u]``, M the bracket above; the
cross terms between the three paths vanish at infinite width (odd in an independent weight
matrix, or 1/n).

Depth
-----
``depth`` counts transformer layers, each two residual merges (attention, then MLP), so a
profile has ``2 * depth`` merges, in the order ``measure`` finds them.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np

from . import _checks
from .profile import Normalised, Profile, Stats, Tokens
from .schemes import Param, clean_params, nonneg_finite

PI = math.pi
#: Above this effective logit variance x = g q (q - k) the theory warns. Being first order in
#: g, it keeps x of the token-varying part's exact (e^x - 1) (large T, log-normal weights)
#: and drops ~x^2/2: a Monte Carlo of the exact softmax puts that at 12% (T = 32) to 15%
#: (T = 128) of the part at x = 0.3 (2% at T = 8). On the reference networks the attention
#: branch's token correlation is then ~0.03 off (0.026 at x = 0.25), inside the gate's band;
#: at x = 0.49 a check fails (README, Transformers).
MAX_LOGIT_VARIANCE = 0.3


# --- layers on the (K, C) state and the gradient kernel G ------------------------------------

def _diag_outer(K):
    d = np.diag(K)
    return np.sqrt(np.outer(d, d))


def _corr(M, K):
    """The correlation of kernel M's entries, on the diagonal variances of K."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = M / _diag_outer(K)
    return np.clip(np.nan_to_num(r, nan=0.0), -1.0, 1.0)


def relu_kernel(rho):
    """E[relu(u) relu(v)] for unit-variance Gaussians of correlation rho."""
    return (np.sqrt(np.maximum(1.0 - rho * rho, 0.0)) + (PI - np.arccos(rho)) * rho) / (2 * PI)


class SeqLayer:
    """A layer of the sequence theory: ``forward(K, C) -> (K, C)`` and
    ``backward(G, K, C) -> G`` (the gradient kernel at its input, given the one at its
    output and the state at its input)."""

    normalises = False

    def forward(self, K, C):
        raise NotImplementedError

    def backward(self, G, K, C):
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Scale(SeqLayer):
    """A weight layer of variance ``gain2 / fan_in`` or a scalar multiplier (gain2 = a^2)."""

    def __init__(self, gain2):
        self.gain2 = float(gain2)

    def forward(self, K, C):
        return self.gain2 * K, self.gain2 * C

    def backward(self, G, K, C):
        return self.gain2 * G


class ReLU(SeqLayer):
    def forward(self, K, C):
        d = _diag_outer(K)
        return d * relu_kernel(_corr(K, K)), d * relu_kernel(_corr(C, K))

    def backward(self, G, K, C):
        return G * (PI - np.arccos(_corr(K, K))) / (2 * PI)


class LayerNorm(SeqLayer):
    """LayerNorm over channels, per token (gain 1, bias 0): each token to second moment 1."""

    normalises = True

    def forward(self, K, C):
        d = _diag_outer(K)
        return K / d, C / d

    def backward(self, G, K, C):
        return G / _diag_outer(K)


class Attention(SeqLayer):
    """Multi-head softmax attention with value and output weights of variance
    ``value_gain2 / fan_in`` and ``out_gain2 / fan_in``; ``logit_var`` is g, the variance
    of a logit between unit-norm tokens; ``causal``: each token attends to its prefix."""

    def __init__(self, logit_var=0.0, causal=False, value_gain2=1.0, out_gain2=1.0):
        self.logit_var = float(logit_var)
        self.causal = bool(causal)
        self.value_gain2 = float(value_gain2)
        self.out_gain2 = float(out_gain2)
        self._P = {}

    def average(self, T):
        """P: the attention of zero logits, (T, T)."""
        if T not in self._P:
            P = np.tril(np.ones((T, T))) if self.causal else np.ones((T, T))
            self._P[T] = P / P.sum(axis=1, keepdims=True)
        return self._P[T]

    def pair_weights(self, Kq, Kk, P, H):
        """E[A_ts A'_uv] to first order in g, (T, T, T, T) indexed [t, s, u, v], for the
        attention matrices A, A' of two sequences whose query and key kernels across them
        are Kq, Kk (within one sequence both are K), and the bracket M of E[d_ts d_uv]. The
        reference form of the closed matrix products ``forward`` and ``backward`` use
        (tests/test_sequence.py checks one against the other); T^4 memory."""
        g = self.logit_var
        PK = P @ Kk              # (P K)[t, v]
        PKP = PK @ P.T           # (P K P^T)[t, u]
        M = (Kk[None, :, None, :] - PK.T[None, :, :, None]
             - PK[:, None, None, :] + PKP[:, None, :, None])
        W = 1.0 + g * Kq[:, None, :, None] * M + H[:, :, None, None] + H[None, None, :, :]
        return P[:, :, None, None] * P[None, None, :, :] * W, M

    def shift(self, K, P):
        """H_ts = (D_ts - sum_v P_tv D_tv) / 2: the second-order mean shift of A_ts / P_ts."""
        g = self.logit_var
        if g == 0.0:
            return np.zeros_like(P)
        PK = P @ K
        PKP_diag = np.einsum("tv,tv->t", PK, P)
        D = g * np.diag(K)[:, None] * (np.diag(K)[None, :] - 2.0 * PK + PKP_diag[:, None])
        return 0.5 * (D - (P * D).sum(axis=1, keepdims=True))

    @staticmethod
    def _quadratic(P, X, Kk):
        """sum_sv P_ts P_uv X[s, v] M[t, s, u, v], M built on Kk: the g term of the output
        kernel, in T^3 matrix products."""
        PK, PX = P @ Kk, P @ X
        return (P @ (X * Kk) @ P.T - P @ ((Kk @ P.T) * (X @ P.T))
                - (PK * PX) @ P.T + (PK @ P.T) * (PX @ P.T))

    @staticmethod
    def _quadratic_t(P, Y, K):
        """sum_tu P_ts P_uv Y[t, u] M[t, s, u, v] (M on K): the g term backwards."""
        PK = P @ K
        return (K * (P.T @ Y @ P) - ((K @ P.T) * (P.T @ Y)) @ P
                - P.T @ (PK * (Y @ P)) + P.T @ (Y * (PK @ P.T)) @ P)

    def forward(self, K, C):
        P = self.average(K.shape[0])
        gain = self.value_gain2 * self.out_gain2
        out_k, out_c = P @ K @ P.T, P @ C @ P.T
        if self.logit_var:
            PH = P * self.shift(K, P)
            g = self.logit_var
            out_k = (out_k + PH @ K @ P.T + P @ K @ PH.T + g * K * self._quadratic(P, K, K))
            out_c = (out_c + PH @ C @ P.T + P @ C @ PH.T + g * C * self._quadratic(P, C, C))
        return gain * out_k, gain * out_c

    def backward(self, G, K, C):
        P = self.average(K.shape[0])
        gain = self.value_gain2 * self.out_gain2
        out = P.T @ G @ P
        if self.logit_var:
            PH = P * self.shift(K, P)
            # The value path's g term and the logits' path to the keys are the same sum
            # (Y = G * K); the logits' path to the queries is the forward's g term times G.
            # dL/dl_ts = A_ts (v_s - out_t) . g_t; at first order the weights are P, and
            # E[(v_s - vbar_t)(v_v - vbar_u)] = value_gain2 M[t, s, u, v].
            y = self._quadratic_t(P, G * K, K)
            out = (out + PH.T @ G @ P + P.T @ G @ PH
                   + self.logit_var * (2.0 * y + G * self._quadratic(P, K, K)))
        return gain * out


# --- blocks and schemes -----------------------------------------------------------------------

@dataclass(frozen=True)
class SubBlock:
    """One residual merge of a transformer layer: ``x <- post(skip_gain x + alpha branch(pre x))``."""

    branch: Tuple[SeqLayer, ...]
    pre: Tuple[SeqLayer, ...] = ()
    post: Tuple[SeqLayer, ...] = ()
    skip_gain: float = 1.0
    kind: str = ""  # "attention" or "mlp"


@dataclass(frozen=True)
class SeqScheme:
    """A registered transformer scheme: ``build(depth, logit_var, causal, **params)`` returns
    the sub-blocks of one layer (attention, MLP) as :class:`SubBlock` s."""

    name: str
    description: str
    reference: str
    build: Callable
    params: Mapping[str, Param] = field(default_factory=dict)
    gate: Tuple[Mapping[str, object], ...] = ({},)
    family: str = ""

    def clean_params(self, params):
        return clean_params(self.name, self.params, params)


def _bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


SEQ_SCHEMES: Dict[str, SeqScheme] = {}


def register_sequence_scheme(scheme: SeqScheme) -> SeqScheme:
    SEQ_SCHEMES[scheme.name] = scheme
    return scheme


def is_sequence_scheme(name) -> bool:
    return isinstance(name, str) and name in SEQ_SCHEMES


def _mlp(gain2=1.0):
    # W1 (LeCun, variance 1 / fan_in), ReLU, W2 (He, 2 / fan_in): q in = q out.
    return (Scale(gain2), ReLU(), Scale(2.0 * gain2))


def _attn(logit_var, causal, gain2=1.0):
    return (Attention(logit_var, causal, value_gain2=gain2, out_gain2=gain2),)


def _preln(depth, logit_var, causal, alpha=1.0):
    a2 = float(alpha) ** 2
    return (SubBlock(_attn(logit_var, causal) + (Scale(a2),), pre=(LayerNorm(),), kind="attention"),
            SubBlock(_mlp() + (Scale(a2),), pre=(LayerNorm(),), kind="mlp"))


def _postln(depth, logit_var, causal):
    return (SubBlock(_attn(logit_var, causal), post=(LayerNorm(),), kind="attention"),
            SubBlock(_mlp(), post=(LayerNorm(),), kind="mlp"))


def _rezero(depth, logit_var, causal, alpha=0.0):
    a2 = float(alpha) ** 2
    return (SubBlock(_attn(logit_var, causal) + (Scale(a2),), kind="attention"),
            SubBlock(_mlp() + (Scale(a2),), kind="mlp"))


def deepnorm_constants(layers, decoder=False):
    """DeepNorm's (alpha, beta) for a stack of ``layers`` layers (Wang et al. 2022, Table 1):
    encoder-only and decoder-only stacks (2N)^(1/4), (8N)^(-1/4); the decoder of an
    encoder-decoder model (3M)^(1/4), (12M)^(-1/4) with ``decoder=True``."""
    n = float(layers)
    if decoder:
        return (3.0 * n) ** 0.25, (12.0 * n) ** -0.25
    return (2.0 * n) ** 0.25, (8.0 * n) ** -0.25


def _deepnorm(depth, logit_var, causal, decoder=False, beta_factor=1.0):
    alpha, beta = deepnorm_constants(depth, decoder)
    b2 = (beta * float(beta_factor)) ** 2
    # beta scales W_V, W_O and both MLP weights (not W_Q, W_K): each branch's second moment
    # by beta^4; the skip operand is alpha x.
    return (SubBlock(_attn(logit_var, causal, gain2=b2), post=(LayerNorm(),), skip_gain=alpha,
                     kind="attention"),
            SubBlock(_mlp(gain2=b2), post=(LayerNorm(),), skip_gain=alpha, kind="mlp"))


def _depth_mup(depth, logit_var, causal):
    return _preln(depth, logit_var, causal, alpha=(2.0 * depth) ** -0.5)


def _completep(depth, logit_var, causal):
    return _preln(depth, logit_var, causal, alpha=1.0 / (2.0 * depth))


_A = "branch multiplier alpha"
for _s in (
    SeqScheme("transformer_preln", "pre-LN transformer: x + alpha f(LN(x)), attention then MLP",
              "Xiong et al. 2020; GPT-2", _preln, {"alpha": Param(1.0, _A, nonneg_finite)},
              family="preln"),
    SeqScheme("transformer_postln", "post-LN transformer: x <- LN(x + f(x))",
              "Vaswani et al. 2017; BERT", _postln, family="postln"),
    SeqScheme("rezero", "ReZero: x + alpha f(x), no normalisation, alpha = 0 at init",
              "Bachlechner et al. 2021", _rezero, {"alpha": Param(0.0, _A, nonneg_finite)},
              gate=({"alpha": 0.0}, {"alpha": 0.1}), family="rezero"),
    SeqScheme("layerscale", "LayerScale: pre-LN with a small per-channel alpha (0.1 at init)",
              "Touvron et al. 2021 (CaiT)", _preln, {"alpha": Param(0.1, _A, nonneg_finite)},
              family="preln"),
    SeqScheme("deepnorm", "DeepNorm: x <- LN(alpha x + f(x)), branch weights scaled by beta",
              "Wang et al. 2022 (DeepNet)", _deepnorm,
              {"decoder": Param(False, "encoder-decoder decoder constants (3M)^1/4, "
                                       "(12M)^-1/4", _bool),
               "beta_factor": Param(1.0, "a factor on beta (1 = the paper's; a mis-set beta "
                                         "is another value)", nonneg_finite)},
              family="deepnorm"),
    SeqScheme("depth_mup", "depth-muP: pre-LN, every branch times 1/sqrt(2 depth)",
              "Yang et al. 2023 (Tensor Programs VI); Bordelon et al. 2023", _depth_mup,
              family="preln"),
    SeqScheme("completep", "CompleteP: pre-LN, every branch times 1/(2 depth)",
              "Dey et al. 2025 (CompleteP)", _completep, family="preln"),
):
    register_sequence_scheme(_s)


# --- the recursion ------------------------------------------------------------------------

def _read(K, C):
    """(q, m, v, token correlation, within-sequence mean) of a state."""
    T = K.shape[0]
    q = float(np.trace(K)) / T
    m = float(C.mean())
    r = _corr(K, K)
    tok = float((r.sum() - np.trace(r)) / (T * (T - 1))) if T > 1 else math.nan
    return q, m, q - m, tok, float(K.mean())


def _run(layers, K, C, tape=None):
    for layer in layers:
        if tape is not None:
            tape.append((layer, K, C))
        K, C = layer.forward(K, C)
    return K, C


def _back(tape, G):
    for layer, K, C in reversed(tape):
        G = layer.backward(G, K, C)
    return G


def predict_sequence(depth: int, scheme: str, *, tokens: int = 32, causal: bool = False,
                     logit_std: float = 0.3, input_second_moment: float = 1.0,
                     input_squared_mean: float = 0.0, input_token_correlation: float = 0.0,
                     **params: Any) -> Profile:
    """The theory of a transformer scheme (``predict`` calls this for sequence schemes).

    The gradient at merge l's skip operand is that of the block input where the skip is
    the identity, and that of the merge's sum where the skip is scaled (DeepNorm's alpha x,
    a new tensor), as ``measure`` reads it; so for DeepNorm grad[D - 1] = grad[D] = 1.

    Args:
        depth: transformer layers (each two merges: attention, then MLP).
        scheme: a sequence scheme (``SEQ_SCHEMES``).
        tokens: sequence length T.
        causal: a causal mask (each token attends to its prefix).
        logit_std: the standard deviation s of an attention logit between unit-norm tokens
            (g = s^2); 0 is uniform attention. Default 0.3: BERT's and GPT-2's N(0, 0.02^2)
            weights at width 768 give query and key weights of variance 0.31 / fan_in, so
            s^2 = 0.31^2 ~ 0.09 after a LayerNorm.
        input_second_moment, input_squared_mean, input_token_correlation: the state of x_0,
            tokens exchangeable: K = q ((1 - r) I + r), C = m.
        **params: the scheme's own (``alpha``; DeepNorm's ``decoder``, ``beta_factor``).
    """
    depth = _checks.positive_int("depth", depth)
    T = _checks.positive_int("tokens", tokens)
    if T < 2:
        raise ValueError(f"tokens must be at least 2 (a token correlation needs two), got {T}")
    s = _checks.finite_float("logit_std", logit_std, low=0.0)
    q0 = _checks.finite_float("input_second_moment", input_second_moment, low=0.0)
    m0 = _checks.finite_float("input_squared_mean", input_squared_mean, low=0.0)
    r0 = _checks.finite_float("input_token_correlation", input_token_correlation,
                              low=-1.0 / (T - 1), high=1.0)
    if q0 <= 0.0 or m0 > q0:
        raise ValueError(f"input_squared_mean must lie in [0, input_second_moment], got "
                         f"{m0} and {q0}")
    if scheme not in SEQ_SCHEMES:
        raise ValueError(f"unknown sequence scheme {scheme!r}; known: {', '.join(SEQ_SCHEMES)}")
    spec = SEQ_SCHEMES[scheme]
    clean = spec.clean_params(params)
    subs = spec.build(depth, s * s, bool(causal), **clean)

    K = q0 * ((1.0 - r0) * np.eye(T) + r0)
    C = np.full((T, T), m0)
    skip: list = []    # per merge, _read of the skip operand (then of the last sum)
    branch: list = []  # per merge, _read of the branch operand
    tapes: list = []
    shares: list = []
    max_logit = 0.0
    for l in range(2 * depth):
        sub = subs[l % 2]
        pre_tape: list = []
        Kp, Cp = _run(sub.pre, K, C, pre_tape)
        for layer in sub.branch:
            if isinstance(layer, Attention) and layer.logit_var > 0:
                q_in, _, _, k_in, _ = _read(Kp, Cp)
                max_logit = max(max_logit, layer.logit_var * q_in * q_in * (1 - k_in))
        br_tape: list = []
        Kb, Cb = _run(sub.branch, Kp, Cp, br_tape)
        a2 = sub.skip_gain ** 2
        Ks, Cs = a2 * K, a2 * C
        for out, (k_, c_) in ((skip, (Ks, Cs)), (branch, (Kb, Cb))):
            out.append(_read(k_, c_))
        Ky, Cy = Ks + Kb, Cs + Cb
        post_tape: list = []
        K, C = _run(sub.post, Ky, Cy, post_tape)
        tapes.append((pre_tape, br_tape, post_tape, a2))
    skip.append(_read(Ky, Cy))
    if max_logit > MAX_LOGIT_VARIANCE:
        warnings.warn(f"the attention's effective logit variance reaches {max_logit:.2f} (logit_std "
                      f"{s}): the second-order expansion of the softmax holds below "
                      f"{MAX_LOGIT_VARIANCE}; expect the token-varying part of the attention "
                      f"output to be underestimated", RuntimeWarning, stacklevel=3)

    # Backward: the read-out at the last merge's sum, independent per token.
    D = 2 * depth
    G = np.eye(T)
    g_trace = [math.nan] * (D + 1)
    g_trace[D] = 1.0
    for l in reversed(range(D)):
        pre_tape, br_tape, post_tape, a2 = tapes[l]
        if l < D - 1:
            G = _back(post_tape, G)
        g_y = float(np.trace(G)) / T
        Gb = _back(pre_tape, _back(br_tape, G))
        Gx = a2 * G + Gb
        tb, tx = float(np.trace(Gb)) / T, float(np.trace(Gx)) / T
        shares.append(min(tb / tx, 1.0) if tx > 0 else 0.0)
        g_trace[l] = tx if a2 == 1.0 else g_y
        G = Gx
    shares.reverse()
    nan = np.full(D + 1, np.nan)

    def stats(rows):
        a = np.array(rows, dtype=np.float64)
        return Stats.from_linear(a[:, 0], a[:, 1], a[:, 2]), a[:, 3], a[:, 4]

    with np.errstate(divide="ignore"):  # a zero branch (ReZero at alpha = 0) is log2 0 = -inf
        skip_st, tok_s, mean_s = stats(skip)
        branch_st, tok_b, mean_b = stats(branch)
        log2_mean_s, log2_mean_b = np.log2(mean_s), np.log2(mean_b)
    has_pre = any(layer.normalises for layer in subs[0].pre)
    has_post = any(layer.normalises for layer in subs[0].post)
    return Profile(
        skip=skip_st, branch=branch_st,
        grad=Stats(np.log2(np.array(g_trace)), nan.copy(), nan.copy()),
        depth=D, projection=np.zeros(D, dtype=bool), source="theory", scheme=scheme,
        params={**clean, "tokens": T, "causal": bool(causal), "logit_std": s},
        branch_norm=tuple("layer" if has_pre else "" for _ in range(D)),
        post_norm=tuple("layer" if has_post and l > 0 else "" for l in range(D)),
        grad_branch_share=np.array(shares),
        normalised=Normalised(branch=has_pre, pre=has_pre, post=has_post),
        input_second_moment=q0, input_squared_mean=m0,
        tokens=Tokens(skip=tok_s, branch=tok_b, log2_skip_sequence_mean=log2_mean_s,
                      log2_branch_sequence_mean=log2_mean_b, length=T),
        meta={"input_second_moment": q0, "input_squared_mean": m0,
              "input_token_correlation": r0, "max_logit_variance": max_logit})
