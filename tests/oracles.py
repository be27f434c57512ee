"""Independent NumPy float64 oracles, written straight from the papers.

Nothing here imports lwrs. The per-sample oracles at the end (torch.func, imported where used) give
the exact per-sample gradient-norm statistics the recorder must match. The momentum oracle keeps the paper's own pair
(w, v) of CLARS eq. (4) rather than lwrs's trace d = v_{t+1} - v_t, so that the
two implementations share no algebra.
"""

from __future__ import annotations

import math

import numpy as np


def norm(x) -> float:
    return float(np.sqrt(np.sum(np.asarray(x, dtype=np.float64) ** 2)))


def ratio_or_one(eta, w_norm, den, eps=0.0, g_norm=1.0):
    """timm / apex convention: 1 where the weight, the raw gradient or the denominator is zero."""
    if w_norm > 0 and den > 0 and g_norm > 0:
        return eta * w_norm / (den + eps)
    return 1.0


class PaperMomentum:
    """mNAG exactly as CLARS eq. (4): v_{t+1} = w_t - gamma_k g_k; w_{t+1} = v_{t+1} + beta (v_{t+1} - v_t)."""

    def __init__(self, params, beta, nesterov=True):
        self.w = [np.array(p, dtype=np.float64) for p in params]
        self.v = [w.copy() for w in self.w]  # v_0 = w_0
        self.beta = beta
        self.nesterov = nesterov
        self.h = [np.zeros_like(w) for w in self.w]  # heavy-ball buffer, used only when nesterov=False

    def step(self, directions, rates):
        for k, (g, rate) in enumerate(zip(directions, rates)):
            if self.nesterov:
                v_new = self.w[k] - rate * np.asarray(g, dtype=np.float64)
                self.w[k] = v_new + self.beta * (v_new - self.v[k])
                self.v[k] = v_new
            else:
                self.h[k] = self.beta * self.h[k] - rate * np.asarray(g, dtype=np.float64)
                self.w[k] = self.w[k] + self.h[k]

    def trace(self):
        """lwrs's d_{t-1} = v_t - v_{t-1}, recovered from w_t - v_t = beta d_{t-1}."""
        if self.nesterov:
            if self.beta == 0:
                return None
            return [(w - v) / self.beta for w, v in zip(self.w, self.v)]
        return self.h


class LayerwiseOracle:
    """mgd / mnag / lars / clars / tvlars as loops over layers, float64."""

    def __init__(self, params, *, kind, lr, beta=0.9, eta=1.0, weight_decay=0.0, form="sum_of_norms",
                 eps=0.0, max_ratio=None, larc=False, adapt=None, decay=None, nesterov=True, phi=None):
        self.kind, self.lr, self.eta, self.wd, self.form = kind, lr, eta, weight_decay, form
        self.eps, self.max_ratio, self.larc, self.phi = eps, max_ratio, larc, phi
        k = len(params)
        self.adapt = adapt if adapt is not None else [np.ndim(p) > 1 for p in params]
        self.decay = decay if decay is not None else [True] * k
        self.mom = PaperMomentum(params, beta, nesterov)
        self.t = 0

    def global_rate(self):
        lr = self.lr(self.t) if callable(self.lr) else self.lr
        if self.phi is not None:
            lr = lr * self.phi(self.t)
        return lr

    def step(self, grads, per_sample=None):
        lr = self.global_rate()
        rates, directions, record = [], [], []
        for k, g in enumerate(grads):
            w = self.mom.w[k]
            g = np.asarray(g, dtype=np.float64)
            wd = self.wd if self.decay[k] else 0.0
            u = g + wd * w
            wn, gn = norm(w), norm(g)
            den = gn + wd * wn if self.form == "sum_of_norms" else norm(u)
            factor = 1.0
            if per_sample is not None:
                samples = np.asarray(per_sample[k], dtype=np.float64)
                if self.form == "sum_of_norms":
                    mean_norm = np.mean([norm(s) for s in samples]) + wd * wn
                else:
                    mean_norm = np.mean([norm(s + wd * w) for s in samples])
                factor = den / mean_norm if mean_norm > 0 else 1.0
            rate = lr
            if self.kind in ("lars", "clars", "tvlars") and self.adapt[k]:
                d = mean_norm if self.kind == "clars" else den
                if self.larc:
                    rate = min(self.eta * wn / d, lr) if (wn > 0 and d > 0 and gn > 0) else lr
                else:
                    r = ratio_or_one(self.eta, wn, d, self.eps, gn)
                    if self.max_ratio is not None and wn > 0 and d > 0 and gn > 0:
                        r = min(r, self.max_ratio)
                    rate = lr * r
            rates.append(rate)
            directions.append(u)
            record.append((wn, gn, factor, rate))
        self.mom.step(directions, rates)
        self.t += 1
        return record


class LambOracle:
    """LAMB (You et al. 2019, Algorithm 2), loops over layers, float64."""

    def __init__(self, params, *, lr, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, adapt=None):
        self.w = [np.array(p, dtype=np.float64) for p in params]
        self.m = [np.zeros_like(w) for w in self.w]
        self.v = [np.zeros_like(w) for w in self.w]
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
        self.adapt = adapt if adapt is not None else [np.ndim(p) > 1 for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        record = []
        for k, g in enumerate(grads):
            g = np.asarray(g, dtype=np.float64)
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            m_hat = self.m[k] / (1 - self.b1**self.t)
            v_hat = self.v[k] / (1 - self.b2**self.t)
            u = m_hat / (np.sqrt(v_hat) + self.eps) + self.wd * self.w[k]
            r = ratio_or_one(1.0, norm(self.w[k]), norm(u), g_norm=norm(g)) if self.adapt[k] else 1.0
            record.append((norm(self.w[k]), norm(g), r, self.lr * r))
            self.w[k] = self.w[k] - self.lr * r * u
        return record


def tvlars_phi(t, *, decay, delay, alpha=1.0, gamma_min=0.0):
    """phi_t = 1 / (alpha + exp(lambda (t - d_e))) + gamma_min, straight from the formula."""
    return 1.0 / (alpha + math.exp(decay * (t - delay))) + gamma_min


def per_sample_norm_sums(model, grads):
    """name -> (sum_i |g_i|, sum_i |g_i|^2) of per-sample gradients ``grads`` (name -> (B, *shape) tensor)."""
    import torch

    out = {}
    for name, _ in model.named_parameters():
        g = grads[name]
        n = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
        out[name] = (n.sum(), (n * n).sum())
    return out


def vmap_oracle(model, loss_one, inputs, dims):
    """name -> (sum_i |g_i|, sum_i |g_i|^2), g_i the gradient of sample i's loss, by torch.func ``vmap(grad)``
    over samples run as batches of one (``loss_one(f, *sample)``, ``f`` the model; ``dims`` the sample axes)."""
    import torch

    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, *sample):
        batch_of_one = [x.unsqueeze(d) for x, d in zip(sample, dims)]
        return loss_one(lambda *a, **kw: torch.func.functional_call(model, p, a, kw), *batch_of_one)

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, *dims))(params, *inputs)
    return per_sample_norm_sums(model, grads)
