"""An app module whose own import fails: the CLI shows that error, not "could not import"."""

import importlib

importlib.import_module("no_such_dependency")
