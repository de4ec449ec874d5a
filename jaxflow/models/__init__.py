"""Model registry: `get_model(name, **config)` builds any registered optical-flow network.

Every model is a linen Module called as `model.apply(variables, image1, image2, train=...)` on float32 RGB
images in [0, 1] of shape (B, H, W, 3), returning a dict with
  - `flow`:  (B, H, W, 2) full-resolution flow in pixels,
  - `flows`: list of multiscale predictions, coarse to fine, each (B, h_k, w_k, 2) at its own level's
             resolution but with values in pixels of the input resolution (as in FlowNet's losses).
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator adding a model class to the registry under `name`."""

  def decorator(cls: type) -> type:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls

  return decorator


def list_models() -> list[str]:
  _import_all()
  return sorted(_REGISTRY)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype: Any) -> Any:
  """Accepts 'float32' / 'bfloat16' (config strings) or a jnp dtype."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unknown compute dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
  return dtype


def get_model(name: str, **config: Any):
  """Builds the model registered as `name` with the given fields (e.g. from `config.model`).

  Unknown names and unknown fields raise a ValueError naming them.
  """
  _import_all()
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; registered models: {sorted(_REGISTRY)}")
  cls = _REGISTRY[name]
  fields = getattr(cls, "__dataclass_fields__", {})
  unknown = sorted(k for k in config if k not in fields or k in ("parent", "name"))
  if unknown:
    known = sorted(k for k in fields if k not in ("parent", "name"))
    raise ValueError(f"model {name!r} has no field(s) {unknown}; its fields are {known}")
  if "dtype" in config:
    config = dict(config, dtype=parse_dtype(config["dtype"]))
  return cls(**config)


def _import_all() -> None:
  # Importing the modules runs their @register decorators.
  from jaxflow.models import flownet, pwcnet, spynet  # noqa: F401
