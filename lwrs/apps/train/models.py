r"""The small models of ``lwrs train``: CLARS Figure 2's 5-layer FCN and CNN, and an MLP.

All take a batch of 1-D signals, shape ``(n, length)``, and return class logits.
Every layer is one that :class:`~lwrs.backends.torch.PerSampleNorms` supports
(Linear, Conv1d), so exact CLARS runs on each. The last Linear layer is the
``head``, the "fully-connected layer" that FC freezing holds still.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "fcn5", "cnn5", "mlp", "layer_names"]

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


def build_model(name: str, length: int, classes: int, *, seed: int) -> Classifier:
    """Build ``"fcn"``, ``"cnn"`` or ``"mlp"`` with weights drawn from ``seed`` (torch's default init).

    Examples
    --------
    >>> import torch
    >>> a, b = build_model("mlp", 40, 10, seed=1), build_model("mlp", 40, 10, seed=1)
    >>> torch.equal(a.head.weight, b.head.weight)
    True
    """
    builders = {"fcn": fcn5, "cnn": cnn5, "mlp": mlp}
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
