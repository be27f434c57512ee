r"""The small models of ``lwrs train``: CLARS Figure 2's 5-layer FCN and CNN, an MLP and a transformer.

All take a batch of 1-D signals, shape ``(n, length)``, and return class logits.
Every layer is one that :class:`~lwrs.backends.torch.PerSampleNorms` supports
(Linear, Conv1d, LayerNorm, MultiheadAttention), so exact CLARS runs on each.
The last Linear layer is the ``head``, the "fully-connected layer" that FC
freezing holds still.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "fcn5", "cnn5", "mlp", "transformer", "layer_names"]

from .config import MODELS

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str) -> type[nn.Module]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


class Classifier(nn.Module):
    """``body`` (feature layers) followed by ``head`` (the last Linear layer)."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def fcn5(length: int, classes: int, *, width: int = 128, activation: str = "sigmoid") -> Classifier:
    r"""The 5-layer fully-connected network of CLARS Figure 2 (sigmoid by default).

    ``length → width → width → width → width → classes``: four hidden layers and
    the head, five weight matrices.

    Examples
    --------
    >>> import torch
    >>> net = fcn5(40, 10)
    >>> net(torch.zeros(3, 40)).shape, len(layer_names(net))
    (torch.Size([3, 10]), 5)
    """
    act = _activation(activation)
    layers: list[nn.Module] = []
    sizes = [length] + [width] * 4
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return Classifier(nn.Sequential(*layers), nn.Linear(width, classes))


def cnn5(length: int, classes: int, *, channels: int = 16, activation: str = "sigmoid") -> Classifier:
    r"""The 5-layer convolutional network of CLARS Figure 2, for 1-D signals (sigmoid by default).

    Four ``Conv1d`` layers (kernel 5, padding 2; the last three with stride 2)
    then the Linear head on the flattened features: five weight tensors.

    Examples
    --------
    >>> import torch
    >>> net = cnn5(40, 10)
    >>> net(torch.zeros(3, 40)).shape, len(layer_names(net))
    (torch.Size([3, 10]), 5)
    """
    act = _activation(activation)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    size, c_in = length, 1
    for i in range(4):
        stride = 1 if i == 0 else 2
        layers += [nn.Conv1d(c_in, channels, kernel_size=5, stride=stride, padding=2), act()]
        size = (size + 2 * 2 - 5) // stride + 1
        c_in = channels
    layers.append(nn.Flatten())
    return Classifier(nn.Sequential(*layers), nn.Linear(channels * size, classes))


def mlp(length: int, classes: int, *, width: int = 256, activation: str = "relu") -> Classifier:
    r"""A 3-layer ReLU MLP, ``length → width → width → classes``.

    Examples
    --------
    >>> import torch
    >>> mlp(40, 10)(torch.zeros(2, 40)).shape
    torch.Size([2, 10])
    """
    act = _activation(activation)
    body = nn.Sequential(nn.Linear(length, width), act(), nn.Linear(width, width), act())
    return Classifier(body, nn.Linear(width, classes))


class _Patches(nn.Module):
    """``(n, length)`` signals to ``(n, length / patch, d_model)`` tokens: a Linear map of each patch plus
    a fixed sinusoidal position code (Vaswani et al. 2017, section 3.5; a buffer, not a parameter)."""

    def __init__(self, length: int, patch: int, d_model: int):
        super().__init__()
        if length % patch:
            raise ValueError(f"the signal length {length} must be a multiple of patch={patch}")
        self.patch = patch
        self.embed = nn.Linear(patch, d_model)
        tokens = length // patch
        position = torch.arange(tokens, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10_000.0) / d_model))
        code = torch.zeros(tokens, d_model)
        code[:, 0::2] = torch.sin(position * frequency)
        code[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
        self.register_buffer("position", code, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.position


class _MeanTokens(nn.Module):
    """The mean over the token axis: ``(n, T, d)`` to ``(n, d)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def transformer(length: int, classes: int, *, patch: int = 4, d_model: int = 64, heads: int = 4, layers: int = 2,
                dim_feedforward: int = 128, dropout: float = 0.0) -> Classifier:
    r"""A small transformer classifier: the signal as a sequence of patches, ``nn.TransformerEncoderLayer`` blocks.

    The signal of length :math:`L` is cut into :math:`T = L / p` patches of
    :math:`p` values; each becomes a token :math:`W_e x_t + b_e + P_t` with
    :math:`P` the sinusoidal position code (Vaswani et al. 2017). ``layers``
    pre-norm encoder blocks (``nn.TransformerEncoderLayer``, ``batch_first``,
    GELU), a final LayerNorm and the mean over tokens feed the Linear head.
    MNIST-1D (:math:`L = 40`, :math:`p = 4`) gives 10 tokens. Measured: CLARS
    (:math:`\eta = 0.1`, cosine decay) at :math:`B = 1024` reached 88.8% test
    accuracy on MNIST-1D after 10 epochs (536 s on 2 shared, busy CPU cores).

    Examples
    --------
    >>> import torch
    >>> net = transformer(40, 10)
    >>> net(torch.zeros(3, 40)).shape, len(layer_names(net))
    (torch.Size([3, 10]), 10)
    """
    blocks = [nn.TransformerEncoderLayer(d_model, heads, dim_feedforward, dropout=dropout, activation="gelu",
                                         batch_first=True, norm_first=True) for _ in range(layers)]
    body = nn.Sequential(_Patches(length, patch, d_model), *blocks, nn.LayerNorm(d_model), _MeanTokens())
    return Classifier(body, nn.Linear(d_model, classes))


def build_model(name: str, length: int, classes: int, *, seed: int) -> Classifier:
    """Build ``"fcn"``, ``"cnn"``, ``"cnn-relu"`` (:func:`cnn5` with ReLU), ``"mlp"`` or ``"transformer"`` with weights drawn from ``seed`` (torch's default init).

    Examples
    --------
    >>> import torch
    >>> a, b = build_model("mlp", 40, 10, seed=1), build_model("mlp", 40, 10, seed=1)
    >>> torch.equal(a.head.weight, b.head.weight)
    True
    """
    builders = {"fcn": fcn5, "cnn": cnn5, "mlp": mlp, "transformer": transformer,
                "cnn-relu": lambda n, c: cnn5(n, c, activation="relu")}  # the ReLU nets of CLARS Figure 3
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builders[name](length, classes)


def layer_names(model: nn.Module) -> list[str]:
    """Names of the weight tensors (the paper's layers :math:`k`), input side first.

    Examples
    --------
    >>> layer_names(mlp(40, 10))
    ['body.0.weight', 'body.2.weight', 'head.weight']
    """
    return [n for n, p in model.named_parameters() if p.ndim > 1]
