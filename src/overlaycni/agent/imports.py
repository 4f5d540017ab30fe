"""Load only the parts of pyroute2 the agent uses.

Design note. ``import pyroute2`` (0.9) runs the package's ``__init__``,
which imports every API it has (NDB, IPDB, nl80211, devlink, IPVS,
conntrack, plan9, ...): about 160 modules, 10.8 MiB of resident memory on
top of what the agent imports anyway, measured in a fresh interpreter.
The data plane needs ``IPRoute`` (rtnetlink), ``NetlinkError`` and, with the
wireguard backend, ``WireGuard``; their modules alone cost 4.8 MiB.
``lean_pyroute2`` puts an unexecuted module object for the package in
``sys.modules`` (the package's own spec and path, so its submodules import
as usual) with a module ``__getattr__`` (PEP 562) that resolves those names
from their modules on first use. Any other name of the package loads the
whole package into that module first, exactly as ``import pyroute2`` would
have: nothing can fail that worked before, it only costs the memory again.
It must run before anything imports pyroute2 (the agent calls it before it
imports the data plane) and does nothing when pyroute2 is already loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

PACKAGE = "pyroute2"
# what the data plane takes from the package's top level -> (module, name)
LAZY = {
    "IPRoute": ("pyroute2.iproute", "IPRoute"),
    "NetNS": ("pyroute2.iproute", "NetNS"),
    "WireGuard": ("pyroute2.netlink.generic.wireguard", "WireGuard"),
    "NetlinkError": ("pyroute2.netlink.exceptions", "NetlinkError"),
}


def lean_pyroute2() -> bool:
    """Install the lean package module; False when pyroute2 is already
    imported or not installed (then nothing changes)."""
    if PACKAGE in sys.modules:
        return False
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    package = importlib.util.module_from_spec(spec)  # __path__, __spec__, __file__; its __init__ not run
    whole = threading.RLock()  # the package's __init__ may ask for its own names while it runs
    done: list[bool] = []  # the whole package was loaded (a closure: the module's own attributes go through __getattr__)

    def __getattr__(name: str) -> Any:  # noqa: N807 - PEP 562's name
        where = LAZY.get(name)
        if where is not None:
            value = getattr(importlib.import_module(where[0]), where[1])
            setattr(package, name, value)
            return value
        if name.startswith("__") or importlib.util.find_spec(f"{PACKAGE}.{name}") is not None:
            # a submodule (``from pyroute2 import config``): the import system loads it
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
        with whole:
            if not done:
                log.debug("pyroute2.%s: loading the whole package", name)
                done.append(True)
                spec.loader.exec_module(package)  # type: ignore[union-attr]
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None

    package.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[PACKAGE] = package
    return True

