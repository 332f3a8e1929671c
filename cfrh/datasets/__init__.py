"""Dataset readers: official layouts of the standard benchmarks and a user's own collection."""
from .base import Collection, DatasetError, DropReport, READERS, read_dataset, register

__all__ = ["Collection", "DatasetError", "DropReport", "READERS", "read_dataset", "register", "load_all"]


def load_all() -> None:
    """Import every reader module so that it registers itself (a missing module is a bug, not a skip)."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base",):
            importlib.import_module(f"{__name__}.{mod.name}")
