"""Run a function once a module has been imported: at once if it already is, else right after the
module's code has run, whoever imports it.

``import d2norm`` uses this to register its norm names and datasets with detectron2 without
importing detectron2 itself, so that :mod:`d2norm.layers` stays usable with torch alone and the
order of ``import d2norm`` and detectron2's imports does not matter.
"""
import importlib.abc
import importlib.util
import sys

__all__ = ["after_import"]


class _CallbackLoader(importlib.abc.Loader):
    """The module's own loader, followed by ``callback(module)``; anything else is the loader's."""

    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        original = self._loader
        while isinstance(original, _CallbackLoader):  # several callbacks for one module
            original = original._loader
        module.__loader__ = module.__spec__.loader = original
        self._callback(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... (inspect, tracebacks)
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; the other finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


def after_import(name, callback):
    """Call ``callback(module)`` once the module ``name`` is imported (now, if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
    elif not any(isinstance(f, _Finder) and f.name == name and f.callback is callback for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(name, callback))
