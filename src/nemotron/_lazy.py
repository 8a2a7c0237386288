"""Package exports imported on first use (PEP 562), so that importing a light submodule (a
config dataclass) does not import a package's heavy ones (torch)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The module `__getattr__` for `package` that imports `name` from its submodule
    `exports[name]` on first access and keeps it in the package's namespace."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
