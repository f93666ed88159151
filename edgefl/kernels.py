"""The public kernel API, from the compiled backend or its pure-NumPy twin.

The compiled Cython modules are used when they import; ``EDGEFL_PUREPYTHON=1`` (or a failed import)
selects the NumPy twin with the same names and results. :data:`BACKEND` says which is active.

All arrays are float32 and C-contiguous unless a function says otherwise; names ending in ``_``
work in place. Every function validates its arguments first and raises ``TypeError`` or
``ValueError`` naming the bad one; the compiled loops then run without the GIL.
"""
import importlib
import os
import types
import warnings

#: kernel module -> the public names it defines (compiled and twin alike).
_MODULES = {
    "clip": ("clip_l2_", "clip_l1_"),
    "noise": ("laplace_", "gaussian_"),
    "topk": ("topk", "topk_ef_", "threshold_select", "randomk"),
    "codec": (
        "encode_indices", "decode_indices",
        "encode_indices_rice", "decode_indices_rice",
        "encode_indices_bitmap", "decode_indices_bitmap",
        "quantize", "dequantize",
    ),
    "sgd": ("softmax_sgd_step_", "mlp_sgd_step_", "mlp_sgd_epochs_", "SGDState"),
}


def _load(package):
    modules = {name: importlib.import_module(f"{package}.{name}") for name in _MODULES}
    for module_name, names in _MODULES.items():
        missing = [n for n in names if not hasattr(modules[module_name], n)]
        if missing:  # a stale build from an older checkout: treat it as not built
            raise ImportError(f"{package}.{module_name} lacks {', '.join(missing)}")
    return modules


def load_backend(backend: str):
    """The public kernels of one backend, whichever is active: for comparing the two.

    Parameters
    ----------
    backend : {"cython", "numpy"}
        The compiled modules or their NumPy twin.

    Returns
    -------
    types.SimpleNamespace
        Every name of :data:`__all__` from that backend (``BACKEND`` is ``backend``).

    Raises
    ------
    ImportError
        ``"cython"`` when the compiled modules are not built.
    """
    packages = {"cython": "edgefl._kernels", "numpy": "edgefl._kernels.fallback"}
    if backend not in packages:
        raise ValueError(f"backend must be 'cython' or 'numpy', got {backend!r}")
    modules = _load(packages[backend])
    return types.SimpleNamespace(BACKEND=backend, **{
        name: getattr(modules[module], name) for module, names in _MODULES.items() for name in names})


def _select():
    if os.environ.get("EDGEFL_PUREPYTHON", "") not in ("", "0"):
        return "numpy", _load("edgefl._kernels.fallback")
    try:
        return "cython", _load("edgefl._kernels")
    except ImportError as exc:  # no compiler on this device, or an unbuilt checkout
        warnings.warn(
            f"edgefl: compiled kernels unavailable ({exc}); using the pure-NumPy twin. "
            "Build them with `pip install .` or `python setup.py build_ext --inplace`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return "numpy", _load("edgefl._kernels.fallback")


#: "cython" or "numpy": the backend in use.
BACKEND, _modules = _select()

for _module_name, _names in _MODULES.items():
    for _name in _names:
        globals()[_name] = getattr(_modules[_module_name], _name)

__all__ = ["BACKEND"] + [name for names in _MODULES.values() for name in names]
del _module_name, _names, _name
