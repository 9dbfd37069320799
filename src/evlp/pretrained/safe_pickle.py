"""Restricted unpickling for checkpoints that ``torch.load(weights_only=True)`` refuses (fairseq's).

Why it is needed. A fairseq trainer checkpoint pickles more than tensors: numpy scalars (spelled the numpy-1.x way,
``numpy.core.multiarray.scalar``), and objects of fairseq classes such as ``fairseq.logging.meters.AverageMeter``.
``weights_only=True`` rejects those globals, and ``weights_only=False`` imports fairseq (not installed, and it should
not need to be) and runs whatever the pickle asks for.

Why it is safe. A pickle can only run code by obtaining a callable and calling it (``REDUCE``, ``NEWOBJ``, ``BUILD``
via ``__setstate__``, ``INST``/``OBJ``). Every callable a pickle can name comes from ``find_class``: the ``GLOBAL`` and
``STACK_GLOBAL`` opcodes and the ``copyreg`` extension registry (``EXT1/2/4``) all go through it, in both the C and the
Python unpickler. The other opcodes only build inert values (numbers, strings, bytes, lists, tuples, dicts, sets).
So ``RestrictedUnpickler.find_class``:

* returns the real object only for the allow-list below: torch's tensor rebuild functions, ``torch.Size`` and
  ``collections.OrderedDict`` (torch itself turns ``torch.*Storage`` names into inert ``StorageType`` markers before
  asking us). Each is an attribute of a module that is already imported. The rebuild functions make a tensor view
  of a storage and store (never call) the backward hooks they are given, which can only be placeholders anyway;
* returns, for every other name, a fresh ``Placeholder`` subclass named after it, without importing its module.
  Calling a placeholder, ``__setstate__``, item assignment and ``append``/``extend`` only record their arguments, so
  ``os.system``, ``builtins.eval`` or a fairseq class named by the file become inert records and nothing runs.

Tensor data never goes through pickle: torch reads it from the zip archive's ``data/`` records (``persistent_load``)
and ``map_location='cpu'`` ignores the device string stored in the file. ``load`` (used by torch for the legacy,
non-zip format) goes through the same unpickler.

``torch.load(path, map_location='cpu', weights_only=False, pickle_module=restricted_pickle_module(replaced=set()))``
is the whole recipe; ``files.read_weight_file`` uses it only after ``weights_only=True`` failed.
"""

from __future__ import annotations

import collections
import pickle
import types

import torch
import torch._utils


class Placeholder:
    """Inert stand-in for a global the allow-list does not cover. It records what the pickle passed to it."""

    qualified_name = "?"

    # __new__ rather than __init__: NEWOBJ (how pickle rebuilds most class instances) calls only cls.__new__.
    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualified_name}>"


# The only real objects a checkpoint's pickle may obtain: (module, name) -> object.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``ALLOWED_GLOBALS`` and turns every other global into a placeholder.

    ``replaced`` collects the names of the placeholders, so that a caller can tell the user what was skipped.
    """

    def __init__(self, file, *, replaced: set[str] | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self.replaced = replaced if replaced is not None else set()

    def find_class(self, module: str, name: str):
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        qualified = f"{module}.{name}"
        self.replaced.add(qualified)
        return type(name, (Placeholder,), {"__module__": module, "qualified_name": qualified})


def restricted_pickle_module(replaced: set[str]) -> types.SimpleNamespace:
    """A stand-in for the ``pickle`` module, for ``torch.load(pickle_module=...)``, that adds the names of the globals
    it replaced to ``replaced``. torch subclasses its ``.Unpickler`` (zip format) and calls its ``.load`` (legacy
    format), constructing both with the file and pickle's keyword arguments only."""

    class Unpickler(RestrictedUnpickler):
        def __init__(self, file, **kwargs):
            super().__init__(file, replaced=replaced, **kwargs)

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__=__name__, Unpickler=Unpickler, load=load)
