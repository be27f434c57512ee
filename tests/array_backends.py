"""The array backends the conformance tests run on, and the check-before-values helper.

Always: NumPy, NumPy with read-only inputs (catches in-place mutation),
array-api-strict and torch on the CPU. When present: JAX, CuPy and torch on
CUDA; an absent library or device is skipped with the reason, not failed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
from array_api_compat import array_namespace, device


@dataclass
class Backend:
    name: str
    make: Callable[[np.ndarray, str], Any]  # (numpy array, dtype name) -> backend array
    to_numpy: Callable[[Any], np.ndarray]
    namespace_of: Callable[[], Any]  # the namespace array_namespace must report
    device: Any = None

    def asarray(self, a, dtype: str = "float64"):
        return self.make(np.asarray(a, dtype=np.float64), dtype)

    def layers(self, arrays, dtype: str = "float64"):
        return [self.asarray(a, dtype) for a in arrays]


def _numpy(readonly: bool) -> Backend:
    def make(a, dtype):
        out = np.array(a, dtype=dtype)
        if readonly:
            out.flags.writeable = False
        return out

    import array_api_compat.numpy as xnp

    return Backend("numpy-readonly" if readonly else "numpy", make, np.asarray, lambda: xnp, "cpu")


def _strict() -> Backend:
    import array_api_strict as xs

    def make(a, dtype):
        return xs.asarray(a, dtype=getattr(xs, dtype))

    return Backend("array-api-strict", make, lambda x: np.asarray(x), lambda: xs, xs.Device("CPU_DEVICE"))


def _torch(dev: str) -> Backend:
    import array_api_compat.torch as xt
    import torch

    def make(a, dtype):
        return torch.asarray(a, dtype=getattr(torch, dtype), device=dev)

    def to_numpy(x):
        return x.detach().to("cpu", torch.float64).numpy()

    return Backend(f"torch-{dev}", make, to_numpy, lambda: xt, torch.device(dev))


def _jax() -> Backend:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    def make(a, dtype):
        return jnp.asarray(a, dtype=getattr(jnp, dtype))

    cpu = jax.devices("cpu")[0]
    return Backend("jax", make, lambda x: np.asarray(x), lambda: jnp, cpu)


def _cupy() -> Backend:
    import array_api_compat.cupy as xc
    import cupy

    def make(a, dtype):
        return cupy.asarray(a, dtype=dtype)

    return Backend("cupy", make, lambda x: cupy.asnumpy(x).astype(np.float64), lambda: xc, cupy.cuda.Device(0))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_torch() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _cuda_cupy() -> bool:
    if not _has("cupy"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device
        return False


BACKENDS: dict[str, tuple[Callable[[], Backend], Callable[[], bool], str]] = {
    "numpy": (lambda: _numpy(False), lambda: True, ""),
    "numpy-readonly": (lambda: _numpy(True), lambda: True, ""),
    "array-api-strict": (_strict, lambda: _has("array_api_strict"), "array-api-strict is not installed"),
    "torch-cpu": (lambda: _torch("cpu"), lambda: _has("torch"), "torch is not installed"),
    "jax": (_jax, lambda: _has("jax"), "jax is not installed"),
    "cupy": (_cupy, _cuda_cupy, "cupy or a CUDA device is not available"),
    "torch-cuda": (lambda: _torch("cuda"), _cuda_torch, "torch has no CUDA device here"),
}
GPU_BACKENDS = {"cupy", "torch-cuda"}


def backend_params() -> list[Any]:
    marks = {name: [pytest.mark.gpu] if name in GPU_BACKENDS else [] for name in BACKENDS}
    return [pytest.param(name, marks=marks[name], id=name) for name in BACKENDS]


def load_backend(name: str) -> Backend:
    factory, available, reason = BACKENDS[name]
    if not available():
        pytest.skip(reason)
    return factory()


TOLERANCE = {"float64": 1e-11, "float32": 2e-5}


def dtype_of(backend: Backend, dtype: str) -> Any:
    return backend.asarray([0.0], dtype).dtype


def assert_array(actual, expected, backend: Backend, dtype: str, *, rtol: float | None = None, atol: float = 0.0, what: str = "array"):
    """Check namespace, device, shape and dtype, then values against a float64 oracle."""
    assert array_namespace(actual) is backend.namespace_of(), (
        f"{what}: namespace {array_namespace(actual).__name__}, expected {backend.namespace_of().__name__}"
    )
    if backend.device is not None:
        assert device(actual) == backend.device, f"{what}: device {device(actual)!r}, expected {backend.device!r}"
    expected = np.asarray(expected, dtype=np.float64)
    assert tuple(actual.shape) == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {expected.shape}"
    assert actual.dtype == dtype_of(backend, dtype), f"{what}: dtype {actual.dtype}, expected {dtype}"
    rtol = TOLERANCE[dtype] if rtol is None else rtol
    np.testing.assert_allclose(backend.to_numpy(actual), expected, rtol=rtol, atol=atol, err_msg=what)
