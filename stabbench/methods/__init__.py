"""Every module in this package that sets `METHOD` is a method, selectable as
`method=<module name>` with its options from conf/method/<module name>.yaml.
Adding a method: copy one module, change it, add its yaml."""
from __future__ import annotations

import importlib
import pkgutil

from stabbench.errors import UserError
from stabbench.methods.base import Method, MethodConfig, Shape, Stage

REGISTRY: dict[str, type[Method]] = {}
for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if hasattr(_module, "METHOD"):
        REGISTRY[_info.name] = _module.METHOD


def create(cfg) -> Method:
    """The method object for a composed `method` config, its options validated."""
    if cfg.name not in REGISTRY:
        raise UserError(f"method={cfg.name!r} is unknown; choose one of: {', '.join(sorted(REGISTRY))}")
    method = REGISTRY[cfg.name](cfg)
    method.validate()
    return method


__all__ = ["REGISTRY", "Method", "MethodConfig", "Shape", "Stage", "create"]
