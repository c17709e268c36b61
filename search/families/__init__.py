"""Model families, one file per family; see ``search.families.base`` for what a family owns.

Importing this package imports every family module in it, and each registers itself.
"""
from __future__ import annotations

import importlib
import pkgutil

from search.families.base import ModelFamily, family_of, get_family, prepare, register_family

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ModelFamily", "family_of", "get_family", "prepare", "register_family"]
