"""Reading pickles without running them: the restricted unpickler ``seqpe_kernels.load_checkpoint`` uses.

``torch.load(weights_only=True)`` refuses files that pickle classes outside its allowlist; the authors' image
checkpoints do (their run config is a yacs ``CfgNode``). Such files are read here with an unpickler that imports
nothing and calls only the globals torch's weights-only loader allows (tensor rebuild functions, OrderedDict,
dtypes, ...); every other class or function a pickle names becomes an :class:`InertObject` recording, as plain
data, the arguments and state the pickle gives it. ``_LenientPickle`` (the opt-in ``allow_unsafe_pickle=True``
path) unpickles for real but stands in placeholders for classes that cannot be imported.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import pickle
from typing import Any, Dict

import torch

__all__ = ["InertObject", "InertPickleWarning"]


class InertPickleWarning(UserWarning):
    """A checkpoint pickles classes or functions that were replaced by :class:`InertObject` (nothing ran)."""


class InertObject(dict):
    """What a pickled object of a class the loader does not trust becomes: data, nothing imported or run.

    Each class or function a pickle names outside the trusted set becomes a subclass of this one whose
    ``pickled_class`` is the name the file gave (``"yacs.config.CfgNode"``, ``"posix.system"``). Where the
    pickle would call it (``__reduce__``, ``__new__``), an instance records the arguments in
    ``pickled_args`` / ``pickled_kwargs``; where it would set state (``__setstate__`` / ``__dict__``), the
    state is kept in ``pickled_state``. Dict items (a yacs CfgNode is a dict subclass) stay items; list items
    go to ``pickled_items``. Attribute reads fall back to dict items and the recorded state, so
    ``cfg.NUM_ATTENTION_HEADS`` reads like the original. Calling the class only records its arguments.
    """

    pickled_class = "?"

    def __new__(cls, *args, **kwargs):
        self = dict.__new__(cls)
        self.__dict__.update(pickled_args=args, pickled_kwargs=kwargs, pickled_state=None, pickled_items=[])
        return self

    def __init__(self, *args, **kwargs):  # arguments are recorded by __new__, never applied
        pass

    def __setstate__(self, state):
        self.__dict__["pickled_state"] = state

    def _state_dict(self) -> dict:
        st = self.__dict__.get("pickled_state")
        if isinstance(st, tuple) and len(st) == 2 and all(s is None or isinstance(s, dict) for s in st):
            return {**(st[0] or {}), **(st[1] or {})}
        return st if isinstance(st, dict) else {}

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self:
            return self[name]
        st = self._state_dict()
        if name in st:
            return st[name]
        raise AttributeError(f"{type(self).pickled_class} (inert) has no item or recorded attribute {name!r}")

    def __reduce__(self):
        raise TypeError(f"an inert stand-in for {type(self).pickled_class} cannot be pickled")

    def __repr__(self):
        extra = []
        if self.__dict__.get("pickled_args"):
            extra.append(f"args={self.pickled_args!r}")
        if self.__dict__.get("pickled_state") is not None:
            extra.append(f"state={self.pickled_state!r}")
        body = dict.__repr__(self) if len(self) or not extra else ""
        return f"<inert {type(self).pickled_class} {' '.join([body] + extra).strip()}>"


def _inert_class(full_name: str) -> type:
    short = full_name.rsplit(".", 1)[-1] or "Inert"
    return type(short if short.isidentifier() else "Inert", (InertObject,),
                {"pickled_class": full_name, "__module__": __name__})


# inert globals that are expected in a run's checkpoint and only hold data: a run config (a yacs CfgNode, from
# whichever module defines it, or an argparse Namespace) and numpy values are read as data without a warning;
# anything else that had to be made inert is reported (InertPickleWarning). Nothing is called either way.
_DATA_CLASSES = {"argparse.Namespace", "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar",
                 "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
                 "numpy._core.multiarray._reconstruct"}


def _is_data_class(name: str) -> bool:
    return name in _DATA_CLASSES or name.endswith(".CfgNode")


def _trusted_globals() -> Dict[str, Any]:
    """Globals the restricted unpickler resolves to the real objects: torch's own weights-only allowlist
    (tensor rebuild functions, storages, dtypes, torch.Size/device, OrderedDict, set ...). Globals a user
    added with torch.serialization.add_safe_globals are not included."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return dict(_get_allowed_globals())
    except Exception:  # pragma: no cover - private torch API moved: a minimal allowlist
        rc = {"collections.OrderedDict": collections.OrderedDict, "torch.Size": torch.Size,
              "torch.device": torch.device, "torch.nn.parameter.Parameter": torch.nn.Parameter,
              "torch.Tensor": torch.Tensor, "builtins.set": set, "_codecs.encode": codecs.encode,
              "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2}
        for name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
            rc[f"torch._utils.{name}"] = getattr(torch._utils, name)
        for t in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool):
            rc[str(t)] = t
        return rc


class _InertUnpickler(pickle._Unpickler):
    """Pure-Python unpickler that imports nothing and calls only trusted globals (see :class:`InertObject`).

    Every opcode that can run code is overridden: GLOBAL/STACK_GLOBAL/INST/EXT* go through ``find_class``
    (trusted object or inert class, never an import); REDUCE/NEWOBJ/NEWOBJ_EX/OBJ/INST call only trusted
    globals (inert classes just record); BUILD sets state only on inert objects, OrderedDicts and tensors (as
    torch's weights-only unpickler does); APPEND(S)/SETITEM(S)/ADDITEMS accept only real lists/dicts/sets
    (and inert objects); trusted globals are never called with inert objects; out-of-band buffers are refused.
    Persistent ids must be tensor storages (torch resolves those).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._trusted = _trusted_globals()
        self._trusted_ids = {id(v) for v in self._trusted.values()}
        self._inert: Dict[str, type] = {}
        self.inert_globals: set = set()

    # --- names -> objects: never an import
    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError(f"bad global name {module!r}.{name!r}")
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self._trusted:
            return self._trusted[full]
        self.inert_globals.add(full)
        if full not in self._inert:
            self._inert[full] = _inert_class(full)
        return self._inert[full]

    # --- calls
    def _is_trusted(self, obj) -> bool:
        return id(obj) in self._trusted_ids

    def _call(self, func, args, kwargs):
        if isinstance(func, type) and issubclass(func, InertObject):
            return InertObject.__new__(func, *args, **kwargs)  # records; runs nothing
        if not self._is_trusted(func):
            raise pickle.UnpicklingError(f"refusing to call {type(func).__name__} {func!r}: not a trusted global")
        if any(isinstance(a, InertObject) for a in args):  # a stand-in's attributes are data the file chose
            raise pickle.UnpicklingError(f"refusing to call {func!r} with an object of an untrusted class")
        if kwargs:
            raise pickle.UnpicklingError(f"refusing keyword arguments for {func!r}")
        if func is codecs.encode:  # protocol-2 bytes: _codecs.encode(str, 'latin1') only
            if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
                raise pickle.UnpicklingError("refusing _codecs.encode with arguments other than (str, 'latin1')")
        elif func is torch._tensor._rebuild_from_type_v2:
            inner, new_type = (args + (None, None))[:2]
            if not (self._is_trusted(inner) and callable(inner) and isinstance(new_type, type)
                    and issubclass(new_type, torch.Tensor) and self._is_trusted(new_type)):
                raise pickle.UnpicklingError("refusing _rebuild_from_type_v2 with an untrusted function or type")
        return func(*args, **kwargs)

    def _new(self, cls, args, kwargs):
        if isinstance(cls, type) and issubclass(cls, InertObject):
            return InertObject.__new__(cls, *args, **kwargs)
        if cls is torch.nn.Parameter and not kwargs:
            return torch.nn.Parameter(*args)
        if any(isinstance(a, InertObject) for a in args):
            raise pickle.UnpicklingError(f"refusing to create {cls!r} from an object of an untrusted class")
        if isinstance(cls, type) and self._is_trusted(cls) and not kwargs:
            return cls.__new__(cls, *args)
        raise pickle.UnpicklingError(f"refusing to create an object of {cls!r}: not a trusted class")

    def load_reduce(self):
        args = self.stack.pop()
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("REDUCE arguments are not a tuple")
        self.stack[-1] = self._call(self.stack[-1], args, {})

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, tuple(args), {}))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, tuple(args), dict(kwargs)))

    def _instantiate(self, klass, args):  # OBJ / INST
        self.append(self._call(klass, tuple(args), {}))

    # --- state
    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, InertObject):
            inst.__dict__["pickled_state"] = state
        elif type(inst) is torch.Tensor:  # legacy tensor state, as torch's weights-only unpickler
            inst.set_(*state)
        elif type(inst) is torch.nn.Parameter:
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and \
                all(isinstance(k, str) for k in state):  # a state dict's _metadata
            inst.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"refusing to set state on {type(inst).__name__}")

    # --- containers
    def load_append(self):
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def load_appends(self):
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    @staticmethod
    def _extend(obj, items):
        if type(obj) is list:
            obj.extend(items)
        elif isinstance(obj, InertObject):
            obj.__dict__["pickled_items"].extend(items)
        else:
            raise pickle.UnpicklingError(f"refusing to append to {type(obj).__name__}")

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems(self.stack[-1], [key, value])

    def load_setitems(self):
        items = self.pop_mark()
        self._setitems(self.stack[-1], items)

    @staticmethod
    def _setitems(obj, items):
        if not (type(obj) in (dict, collections.OrderedDict, collections.Counter) or isinstance(obj, InertObject)):
            raise pickle.UnpicklingError(f"refusing to set items on {type(obj).__name__}")
        for i in range(0, len(items), 2):
            obj[items[i]] = items[i + 1]  # dict / OrderedDict / Counter / InertObject: no user code

    def load_additems(self):
        items = self.pop_mark()
        obj = self.stack[-1]
        if type(obj) is not set:
            raise pickle.UnpicklingError(f"refusing to add items to {type(obj).__name__}")
        obj.update(items)

    def load_refused(self):
        raise pickle.UnpicklingError("out-of-band pickle buffers are not supported")

    # --- persistent ids: tensor storages only, as torch's weights-only unpickler (legacy files' "module" ids
    # make torch read source files)
    def load_binpersid(self):
        pid = self.stack.pop()
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"refusing persistent id {str(pid)[:80]!r}: only tensor storages")
        self.append(self.persistent_load(pid))

    def load_persid_refused(self):
        raise pickle.UnpicklingError("refusing a text persistent id: only tensor storages")


for _op, _fn in ((pickle.REDUCE, _InertUnpickler.load_reduce), (pickle.NEWOBJ, _InertUnpickler.load_newobj),
                 (pickle.NEWOBJ_EX, _InertUnpickler.load_newobj_ex), (pickle.BUILD, _InertUnpickler.load_build),
                 (pickle.APPEND, _InertUnpickler.load_append), (pickle.APPENDS, _InertUnpickler.load_appends),
                 (pickle.SETITEM, _InertUnpickler.load_setitem), (pickle.SETITEMS, _InertUnpickler.load_setitems),
                 (pickle.ADDITEMS, _InertUnpickler.load_additems),
                 (pickle.BINPERSID, _InertUnpickler.load_binpersid),
                 (pickle.PERSID, _InertUnpickler.load_persid_refused),
                 (pickle.NEXT_BUFFER, _InertUnpickler.load_refused),
                 (pickle.READONLY_BUFFER, _InertUnpickler.load_refused)):
    _InertUnpickler.dispatch[_op[0]] = _fn
del _op, _fn
# OBJ and INST reach _instantiate (overridden); GLOBAL, STACK_GLOBAL, INST and EXT1/2/4 reach find_class.


class _InertPickle:
    """``pickle_module`` for torch.load: the restricted :class:`_InertUnpickler`; records the inert globals."""

    __name__ = "seqpe_kernels.safe_pickle._InertPickle"

    def __init__(self):
        self.inert_globals: set = set()
        outer = self

        class Unpickler(_InertUnpickler):
            def load(self):
                try:
                    return super().load()
                finally:
                    outer.inert_globals |= self.inert_globals

        self.Unpickler = Unpickler

    def load(self, f, **kwargs):
        return self.Unpickler(f, **kwargs).load()


class _LenientUnpickler(pickle.Unpickler):
    """Real unpickling (allow_unsafe_pickle=True); only classes that cannot be imported become inert."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _inert_class(f"{module}.{name}")


class _LenientPickle:
    Unpickler = _LenientUnpickler
    __name__ = "seqpe_kernels.safe_pickle._LenientPickle"

    @staticmethod
    def load(f, **kwargs):
        return _LenientUnpickler(f, **kwargs).load()
