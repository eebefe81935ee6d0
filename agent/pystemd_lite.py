"""pystemd's D-Bus calls without its introspection layer (and the lxml it loads).

``import pystemd.dbuslib`` first runs ``pystemd/__init__.py``, which imports
``pystemd.systemd1`` and ``machine1``: SDObject's introspection, parsed with lxml. The agent
only makes plain calls (``dbuslib.DBus.call_method``, ``apply_signature``) and builds
StartTransientUnit's properties with ``unit_signatures``; loading the rest cost the inspection
worker about 6 MiB of its RSS.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_SIGNATURES = "agent._pystemd_unit_signatures"


def bare_pystemd() -> None:
    """Make ``pystemd`` a package whose ``__init__`` runs only when one of its own names is
    asked for (``pystemd.SDUnit``); its submodules (``pystemd.dbuslib``) import as usual.
    A no-op when pystemd is already imported or missing."""
    if "pystemd" in sys.modules:
        return
    spec = importlib.util.find_spec("pystemd")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    loading = []

    def __getattr__(name: str) -> Any:
        # The full package on demand: whoever wants pystemd.systemd1.Unit & co. gets them.
        if name.startswith("__") or loading:
            raise AttributeError(name)
        loading.append(name)
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)  # type: ignore[union-attr]
        return getattr(package, name)

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules["pystemd"] = package


def unit_signatures() -> ModuleType:
    """pystemd.systemd1.unit_signatures (signature_array, KNOWN_UNIT_SIGNATURES), loaded from
    its file when pystemd.systemd1 (whose __init__ imports lxml) is not imported already."""
    loaded = sys.modules.get("pystemd.systemd1.unit_signatures") or sys.modules.get(_SIGNATURES)
    if loaded is not None:
        return loaded
    bare_pystemd()
    package = importlib.util.find_spec("pystemd")
    assert package is not None and package.submodule_search_locations is not None
    path = Path(list(package.submodule_search_locations)[0]) / "systemd1" / "unit_signatures.py"
    spec = importlib.util.spec_from_file_location(_SIGNATURES, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_SIGNATURES] = module
    spec.loader.exec_module(module)
    return module


def start_transient_unit(bus: Any, name: bytes, mode: bytes,
                         properties: dict[bytes, Any]) -> Any:
    """Manager.StartTransientUnit(name, mode, properties, no auxiliary units), marshalled
    exactly as pystemd's Manager does it; returns the job path."""
    from pystemd.dbuslib import apply_signature

    signatures = unit_signatures()
    args = apply_signature(b"ss", [name, mode])
    args += signatures.signature_array(properties)
    args += [(ord(b"a"), b"(sa(sv))"), (-1, None)]
    return bus.call_method(b"org.freedesktop.systemd1", b"/org/freedesktop/systemd1",
                           b"org.freedesktop.systemd1.Manager", b"StartTransientUnit",
                           args).body
