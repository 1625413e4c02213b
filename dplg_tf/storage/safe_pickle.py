"""Reading ground-truth pickles without trusting them.

Revisited Oxford / Paris ground truth comes as `gnd_*.pkl` files from the
internet. `load(path)` reads one with Python's pure-Python unpickler, whose
opcodes we can restrict one by one:

- only plain-data opcodes run (no INST/OBJ/NEWOBJ, no extension registry,
  no persistent ids, no out-of-band buffers);
- the only callables a file can name are small stand-ins for what NumPy's
  pickles need (an array's or scalar's dtype and raw bytes) and for set,
  frozenset, complex, bytearray and latin-1 text: each checks its arguments,
  so no object array, no pointer and no allocation larger than the file
  itself can be made;
- BUILD (set an object's state) applies only to those stand-ins.

Arrays and scalars are built from the file's own bytes once loading is
done; memo references are followed once each, so a file that shares one
list many times cannot make the walk blow up. Any failure, from a refused
opcode to a cut file, raises UnsafePickleError with one sentence.
"""

import io
import os
import pickle
import re

import numpy as np

from dplg_tf.errors import UserError

MAX_BYTES = 256 << 20      # ground-truth files are a few MB
_NUMERIC = re.compile(r"^[biuf](1|2|4|8)$")


class UnsafePickleError(pickle.UnpicklingError, UserError):
    """A pickle holds something other than plain data, or is broken."""


class _NdarrayClass:
    """Stands for numpy.ndarray as the first argument of _reconstruct."""


class _DType:
    """A numeric dtype named in the file ('f8', 'i8', ...), byte order from BUILD."""

    def __init__(self, name, align=False, copy=True):
        del align, copy
        if not isinstance(name, str) or not _NUMERIC.match(name):
            raise UnsafePickleError(f"dtype {name!r} is not a plain number type")
        self.name, self.order = name, "<"

    def set_state(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in "<>|=":
            raise UnsafePickleError("a dtype's state is not a byte order")
        self.order = state[1] if state[1] in "<>" else "<"

    def numpy(self):
        return np.dtype(self.order + self.name)


def _raw(data):
    """Bytes of an array's data (Python 2 pickles give latin-1 text)."""
    if isinstance(data, str):
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise UnsafePickleError("an array's data is not bytes")


def _shape(shape):
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise UnsafePickleError(f"an array's shape {shape!r} is not a tuple of sizes")
    return shape


def _array(dtype, shape, data, fortran=False):
    if not isinstance(dtype, _DType):
        raise UnsafePickleError("an array's dtype is not a plain number type")
    dtype = dtype.numpy()
    raw = _raw(data)
    count = int(np.prod(_shape(shape), dtype=object))
    if count * dtype.itemsize != len(raw):
        raise UnsafePickleError(f"an array of shape {shape} needs {count * dtype.itemsize} "
                                f"bytes but the file gives {len(raw)}")
    return np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


class _Array:
    """numpy's _reconstruct(ndarray, (0,), b'b') followed by BUILD(state)."""

    def __init__(self, cls, shape, code):
        del shape, code  # the real shape comes with the state
        if cls is not _NdarrayClass:
            raise UnsafePickleError("_reconstruct may only build a NumPy array")
        self.value = None

    def set_state(self, state):
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("an array's state is not (version, shape, dtype, "
                                    "fortran, data)")
        _, shape, dtype, fortran, data = state
        self.value = _array(dtype, shape, data, bool(fortran))


def _scalar(dtype, data=None):
    if not isinstance(dtype, _DType):
        raise UnsafePickleError("a scalar's dtype is not a plain number type")
    return _array(dtype, (), data)[()]


def _frombuffer(buffer, dtype, shape, order):
    return _array(dtype, shape, buffer, order == "F")


def _container(kind):
    def build(items=()):
        if not isinstance(items, (list, tuple)):
            raise UnsafePickleError(f"{kind.__name__} of something other than a list")
        return kind(items)
    return build


def _complex(real=0.0, imag=0.0):
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise UnsafePickleError("complex of something other than numbers")
    return complex(real, imag)


def _bytearray(data=b""):
    return bytearray(_raw(data))  # never bytearray(n): that allocates n bytes


def _bytes(data=b""):
    """bytes() (protocol-2 pickles of Python 3 write b'' as a call of it)."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise UnsafePickleError("bytes of something other than bytes")


def _encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is allowed for latin-1 text only")
    return text.encode("latin1")


CALLABLES = {
    ("numpy", "ndarray"): _NdarrayClass,
    ("numpy", "dtype"): _DType,
    ("builtins", "set"): _container(set), ("__builtin__", "set"): _container(set),
    ("builtins", "frozenset"): _container(frozenset),
    ("builtins", "complex"): _complex,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "bytes"): _bytes, ("__builtin__", "bytes"): _bytes,
    ("_codecs", "encode"): _encode,
}
for _core in ("numpy.core", "numpy._core"):
    CALLABLES[(f"{_core}.multiarray", "_reconstruct")] = _Array
    CALLABLES[(f"{_core}.multiarray", "scalar")] = _scalar
    CALLABLES[(f"{_core}.numeric", "_frombuffer")] = _frombuffer

_REFUSED_OPCODES = (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.EXT1,
                    pickle.EXT2, pickle.EXT4, pickle.PERSID, pickle.BINPERSID,
                    pickle.NEXT_BUFFER, pickle.READONLY_BUFFER)


class Unpickler(pickle._Unpickler):  # the pure-Python one: its opcodes can be replaced
    """The restricted unpickler; a subclass may widen `callables` and `buildable`."""

    dispatch = dict(pickle._Unpickler.dispatch)
    callables = CALLABLES
    what = "a ground-truth file"

    def find_class(self, module, name):
        try:
            return self.callables[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"it names {module}.{name}, which {self.what} "
                                    "never needs") from None

    def buildable(self, target):
        return isinstance(target, (_Array, _DType))

    def _refuse(self):
        raise UnsafePickleError("it uses a pickle opcode that builds arbitrary objects")

    def _bytearray8(self):
        """BYTEARRAY8, its declared length checked against the file first (the
        stock opcode allocates the length it reads before reading the bytes)."""
        import struct

        (length,) = struct.unpack("<Q", self.read(8))
        if length > self.size_limit:
            raise UnsafePickleError(f"it declares a bytearray of {length} bytes in a file of "
                                    f"{self.size_limit}")
        data = self.read(length)
        if len(data) != length:
            raise UnsafePickleError("it is cut short")
        self.append(bytearray(data))

    def _build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if not self.buildable(target):
            raise UnsafePickleError("it sets the state of an object that is not a NumPy "
                                    "array or dtype")
        target.set_state(state)


for _op in _REFUSED_OPCODES:
    Unpickler.dispatch[_op[0]] = Unpickler._refuse
Unpickler.dispatch[pickle.BUILD[0]] = Unpickler._build
Unpickler.dispatch[pickle.BYTEARRAY8[0]] = Unpickler._bytearray8


def _resolve(obj, seen):
    """`obj` with every stand-in replaced by its value (each object visited once)."""
    key = id(obj)
    if key in seen:
        return seen[key]
    if isinstance(obj, _Array):
        if obj.value is None:
            raise UnsafePickleError("an array has no data")
        result = obj.value
    elif isinstance(obj, _DType):
        result = obj.numpy()
    elif isinstance(obj, list):
        result = seen[key] = []
        result.extend(_resolve(v, seen) for v in obj)
    elif isinstance(obj, dict):
        result = seen[key] = {}
        for k, v in obj.items():
            result[_resolve(k, seen)] = _resolve(v, seen)
    elif isinstance(obj, tuple):
        result = tuple(_resolve(v, seen) for v in obj)
    elif isinstance(obj, (set, frozenset)):
        result = type(obj)(_resolve(v, seen) for v in obj)
    else:
        result = obj
    seen[key] = result
    return result


def loads(data):
    """The plain data in pickle bytes `data`, or UnsafePickleError."""
    try:
        unpickler = Unpickler(io.BytesIO(data), encoding="latin1")
        unpickler.size_limit = len(data)
        obj = unpickler.load()
        return _resolve(obj, {})
    except UnsafePickleError:
        raise
    except RecursionError:
        raise UnsafePickleError("it is nested too deeply") from None
    except MemoryError:
        raise UnsafePickleError("it needs more memory than its size allows") from None
    except Exception as e:  # noqa: BLE001 - a broken file, whatever broke
        raise UnsafePickleError(f"it is not a valid pickle ({type(e).__name__}: "
                                f"{str(e)[:200]})") from None


def load(path, max_bytes=MAX_BYTES):
    """The plain data in the pickle file `path`; UnsafePickleError names the file."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UnsafePickleError(f"{path} is {size} bytes, more than a ground-truth file "
                                f"holds ({max_bytes}); it was not loaded.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return loads(data)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path} was not loaded: {e}.") from None
