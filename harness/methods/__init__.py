"""The methods under test: how the frozen base is held while LoRA trains on it.

Adding a method (HQQ, torchao NF4, LoftQ, …) is one file in this folder:

1. Write ``harness/methods/<family>.py`` with a subclass of :class:`harness.methods.base.Method` that sets
   ``name``, ``label``, ``colour`` (and ``quantized``, ``packages``) and implements at least
   ``round_trip`` and ``bits_per_param``; override ``from_pretrained_kwargs``, ``build_linear``,
   ``param_storage``, ``prepare_for_training``, ``merge``, ``quantized_codes`` and ``dequantized`` where
   the base defaults (a 16-bit base) do not hold.
2. End the file with ``METHODS = (YourMethod(),)``. Every module of this package is read at import, so
   the registry, the suite schema, the estimator and the report know the method with no other edit.
3. Name it in a suite's ``matrix.method``.

Nothing outside this package imports a quantization library or branches on a method's name.
"""

from __future__ import annotations

from harness import registry
from harness.methods.base import DTYPE_BYTES, Method, RoundTrip, Storage, nbytes, torch_dtype

__all__ = ["DTYPE_BYTES", "METHODS", "Method", "RoundTrip", "Storage", "get", "names", "nbytes",
           "packages", "torch_dtype", "REFERENCE"]


def _discover() -> dict[str, Method]:
    return registry.discover(__name__, __path__, "METHODS", "method", skip=("base",))


_ORDER = ("lora-bf16", "qlora-nf4", "qlora-nf4-dq", "qlora-fp4", "qlora-fp4-dq")  # the paper's five first
METHODS: dict[str, Method] = dict(sorted(_discover().items(),
                                         key=lambda kv: (_ORDER.index(kv[0]) if kv[0] in _ORDER else len(_ORDER),
                                                         kv[0])))


REFERENCE = "lora-bf16"  # what every other method is compared with unless a suite names another


def get(name: str) -> Method:
    """The registered method called ``name``; a ValueError listing the known ones otherwise."""
    return registry.lookup(METHODS, name, "method")


def names() -> list[str]:
    return list(METHODS)


def packages() -> tuple[str, ...]:
    """Distributions the registered methods load, for the environment a record carries."""
    return tuple(dict.fromkeys(p for m in METHODS.values() for p in m.packages))
