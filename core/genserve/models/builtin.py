"""Architectures that ship with the core, registered like any plugin's.

Every module in ``genserve.models`` that defines ``ARCHITECTURES`` (model_type -> class) is
registered, so adding an architecture is adding one module.
"""

import pkgutil
from importlib import import_module

import genserve.models
from genserve.hookspecs import hookimpl


@hookimpl
def genserve_register_architectures(register):
    for info in pkgutil.iter_modules(genserve.models.__path__):
        module = import_module(f"genserve.models.{info.name}")
        for model_type, cls in getattr(module, "ARCHITECTURES", {}).items():
            register(model_type, cls)
