"""Reading other frameworks' weight files without their code: PyTorch and safetensors.

`read_state_dict(path)` -> {name: float32/int NumPy array} for

- PyTorch `torch.save` files, the zip format (torch >= 1.6: `*/data.pkl` and
  one entry per storage) and the legacy stream (a magic number, protocol and
  system pickles, the object's pickle, the storage keys, then each storage as
  an 8-byte element count and its bytes);
- `.safetensors` files (an 8-byte header length, a JSON header of names,
  dtypes, shapes and byte ranges, then the data).

Nothing from the file runs. The pickles go through dplg_tf.storage.safe_pickle's
restricted unpickler, extended with stand-ins for what a state dict needs:
collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter
and the storage classes of plain number types (as persistent ids). Any
other name is refused by name. Every declared size (a storage's elements, a
tensor's extent within its storage, a header's length, a byte range) is
checked against the bytes the file really holds before anything is
allocated. A checkpoint whose weights sit under a key ("state_dict",
"model_state", "model", ...) is unwrapped; optimiser state is dropped.
Any problem raises CheckpointError (a UserError) with one sentence.
"""

import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.storage import safe_pickle

MAX_PICKLE_BYTES = 64 << 20      # a state dict's pickle holds names and shapes only
MAX_HEADER_BYTES = 64 << 20      # safetensors' own limit is 100 MB
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# keys under which training scripts keep the weights (torchvision, timm, pycls/CVNet/DOLG)
WRAPPER_KEYS = ("state_dict", "model_state", "model", "net", "module", "weights")


class CheckpointError(UserError):
    """A weight file that is not a plain checkpoint, or is damaged."""


# storage class -> (NumPy dtype, bytes an element); bfloat16 is read as uint16 bits
_STORAGES = {
    "FloatStorage": ("<f4", 4), "DoubleStorage": ("<f8", 8), "HalfStorage": ("<f2", 2),
    "BFloat16Storage": ("bf16", 2), "LongStorage": ("<i8", 8), "IntStorage": ("<i4", 4),
    "ShortStorage": ("<i2", 2), "CharStorage": ("i1", 1), "ByteStorage": ("u1", 1),
    "BoolStorage": ("?", 1), "UntypedStorage": ("u1", 1),
}
_SAFETENSORS_DTYPES = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("bf16", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
    "U8": ("u1", 1), "BOOL": ("?", 1),
}


def _fail(message):
    raise CheckpointError(message)


class _StorageClass:
    def __init__(self, name):
        self.name = name
        self.dtype, self.itemsize = _STORAGES[name]


class _Storage:
    """A persistent id ('storage', class, key, location, numel[, view])."""

    def __init__(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            _fail("it refers to an object outside its pickle that is not a tensor storage")
        _, cls, key, location, numel = pid[:5]
        if not isinstance(cls, _StorageClass):
            _fail("a storage is not of a plain number type")
        if not isinstance(key, str) or not isinstance(location, str) or not (
                isinstance(numel, int) and 0 <= numel):
            _fail("a storage's key, device or size is malformed")
        if len(pid) == 6 and pid[5] is not None:
            _fail("it uses storage views, which only very old PyTorch versions wrote")
        self.cls, self.key, self.numel = cls, key, numel


class _Tensor:
    """_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])."""

    def __init__(self, storage, offset, size, stride, requires_grad=False, hooks=None,
                 metadata=None):
        del requires_grad, hooks, metadata
        if not isinstance(storage, _Storage):
            _fail("a tensor is not built on a storage")
        for name, value in (("size", size), ("stride", stride)):
            if not isinstance(value, tuple) or not all(
                    isinstance(v, int) and v >= 0 for v in value):
                _fail(f"a tensor's {name} is not a tuple of sizes")
        if len(size) != len(stride) or not isinstance(offset, int) or offset < 0:
            _fail("a tensor's size, stride and offset do not agree")
        count = 1
        for s in size:
            count *= s
        end = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if count else offset
        if end > storage.numel:
            _fail(f"a tensor reaches element {end} of a storage of {storage.numel}")
        if count > storage.numel:  # a broadcast view: a few bytes could ask for terabytes
            _fail(f"a tensor of {count} elements repeats a storage of {storage.numel}")
        self.count = count
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self, data):
        """The tensor's values from its storage's array `data` (a copy, C order)."""
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * item for s in self.stride],
            writeable=False) if data.size else np.zeros(self.size, data.dtype)
        return np.array(view, order="C")  # a copy; 0-d stays 0-d


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    del requires_grad, hooks
    if not isinstance(data, _Tensor):
        _fail("a parameter does not hold a tensor")
    return data


class _ParameterType:
    """torch.nn.parameter.Parameter, as the type argument of _rebuild_from_type_v2."""


def _rebuild_from_type(func, new_type, args, state=None):
    del state
    if new_type is not _ParameterType or func not in (_Tensor, _rebuild_parameter) or (
            not isinstance(args, tuple)):
        _fail("it rebuilds a tensor subclass other than a parameter")
    return func(*args)


class _OrderedDict(dict):
    """collections.OrderedDict; its BUILD (a state dict's `_metadata`) is dropped."""

    def set_state(self, state):
        del state


_TORCH_CALLABLES = dict(safe_pickle.CALLABLES)
_TORCH_CALLABLES.update({
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): _ParameterType,
})
for _name in _STORAGES:
    _TORCH_CALLABLES[("torch", _name)] = _StorageClass(_name)


class _TorchUnpickler(safe_pickle.Unpickler):
    """safe_pickle's unpickler plus persistent ids that name storages."""

    dispatch = dict(safe_pickle.Unpickler.dispatch)
    callables = _TORCH_CALLABLES
    what = "a weight file"

    def persistent_load(self, pid):
        storage = _Storage(pid)
        known = self.storages.setdefault(storage.key, storage)
        if known.numel != storage.numel or known.cls.name != storage.cls.name:
            _fail(f"storage {storage.key!r} is declared twice with different sizes")
        return known

    def buildable(self, target):
        return isinstance(target, _OrderedDict) or super().buildable(target)


_TorchUnpickler.dispatch[pickle.BINPERSID[0]] = pickle._Unpickler.load_binpersid
_TorchUnpickler.dispatch[pickle.PERSID[0]] = pickle._Unpickler.load_persid


def _unpickle(data, storages=None):
    stream = io.BytesIO(data)
    unpickler = _TorchUnpickler(stream, encoding="latin1")
    unpickler.size_limit = len(data)
    unpickler.storages = {} if storages is None else storages
    try:
        obj = unpickler.load()
    except (CheckpointError, safe_pickle.UnsafePickleError):
        raise
    except RecursionError:
        _fail("its pickle is nested too deeply")
    except Exception as e:  # noqa: BLE001 - a broken pickle, whatever broke
        _fail(f"its pickle is damaged ({type(e).__name__}: {str(e)[:160]})")
    return obj, unpickler.storages, stream.tell()


def _tensors(obj):
    """Every (name, _Tensor) of a state dict (nested dicts give dotted names)."""
    found = {}

    def walk(value, prefix):
        if isinstance(value, _Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str):
                    walk(v, f"{prefix}.{k}" if prefix else k)
    walk(obj, "")
    return found


def _unwrap(obj):
    """The weights of a checkpoint that keeps them under a key, else `obj`."""
    if not isinstance(obj, dict):
        _fail("it holds no dictionary of tensors (a whole pickled model is not read; "
              "save its state_dict() instead)")
    if any(isinstance(v, _Tensor) for v in obj.values()):
        return obj
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), dict) and _tensors(obj[key]):
            return obj[key]
    return obj


def _from_storages(obj, storages, read):
    """{name: array} with each storage's bytes from `read(storage, nbytes)`.

    Every storage a tensor uses is read (and so checked against the file)
    before any tensor is built; the tensors may not ask for more than four
    times those bytes (views that share a storage)."""
    del storages  # those no tensor uses are never read
    tensors = _tensors(_unwrap(obj))
    if not tensors:
        _fail("it holds no tensors")
    data = {}
    for tensor in tensors.values():
        storage = tensor.storage
        if storage.key not in data:
            raw = read(storage, storage.numel * storage.cls.itemsize)
            data[storage.key] = _as_array(raw, storage.cls.dtype)
    stored = sum(a.nbytes for a in data.values())
    wanted = sum(t.count * data[t.storage.key].itemsize for t in tensors.values())
    if wanted > 4 * stored + (1 << 20):
        _fail(f"its tensors would take {wanted} bytes from {stored} bytes of storages")
    return {name: t.array(data[t.storage.key]) for name, t in tensors.items()}


def _as_array(raw, dtype):
    if dtype == "bf16":  # the upper half of a float32
        bits = np.frombuffer(raw, "<u2").astype("<u4") << 16
        return bits.view("<f4")
    return np.frombuffer(raw, dtype)


def _read_zip(path):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        _fail(f"it is not a readable zip archive ({e})")
    with archive:
        infos = {i.filename: i for i in archive.infolist()}
        pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            _fail("it is a zip archive but not one written by torch.save (no single "
                  "<name>/data.pkl)")
        root = pickles[0][:-len("data.pkl")]
        info = infos[pickles[0]]
        if info.file_size > MAX_PICKLE_BYTES:
            _fail(f"its pickle declares {info.file_size} bytes, more than a state dict needs")
        byteorder = infos.get(root + "byteorder")
        if byteorder is not None and archive.read(byteorder)[:16] not in (b"little",):
            _fail("it was written on a big-endian machine, which is not supported")
        try:
            obj, storages, _ = _unpickle(archive.read(info))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            _fail(f"its zip archive is damaged ({e})")

        def read(storage, nbytes):
            entry = infos.get(f"{root}data/{storage.key}")
            if entry is None:
                _fail(f"storage {storage.key!r} is missing from the archive")
            if entry.file_size != nbytes:
                _fail(f"storage {storage.key!r} declares {nbytes} bytes but the archive "
                      f"holds {entry.file_size}")
            if entry.compress_type != zipfile.ZIP_STORED and (
                    entry.file_size > 1024 * max(entry.compress_size, 1)):
                _fail(f"storage {storage.key!r} inflates more than 1024 times")
            try:
                with archive.open(entry) as f:
                    raw = f.read(nbytes)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                _fail(f"storage {storage.key!r} cannot be read ({e})")
            if len(raw) != nbytes:
                _fail(f"storage {storage.key!r} is cut short")
            return raw

        return _from_storages(obj, storages, read)


def _read_legacy(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(MAX_PICKLE_BYTES)  # the pickles come first; storages are read below
        pos = 0
        parts = []
        for _ in range(4):  # magic, protocol, system info, the object
            value, storages, used = _unpickle(data[pos:])
            parts.append((value, storages))
            pos += used
        magic, protocol = parts[0][0], parts[1][0]
        if magic != LEGACY_MAGIC:
            _fail("it is neither a zip archive nor a legacy torch.save file")
        if protocol != 1001:
            _fail(f"its legacy format version {protocol!r} is not 1001")
        obj, storages = parts[3]
        keys, _, used = _unpickle(data[pos:])
        pos += used
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            _fail("its list of storage keys is malformed")
        if set(keys) != set(storages):
            _fail("its storage keys do not match the tensors it declares")
        f.seek(pos)
        offsets = {}
        for key in keys:  # each: an 8-byte element count, then the bytes
            head = f.read(8)
            if len(head) != 8:
                _fail(f"it is cut short before storage {key!r}")
            (count,) = struct.unpack("<q", head)
            storage = storages[key]
            if count != storage.numel:
                _fail(f"storage {key!r} is declared with {storage.numel} elements but "
                      f"stored with {count}")
            nbytes = count * storage.cls.itemsize
            if f.tell() + nbytes > size:
                _fail(f"storage {key!r} declares {nbytes} bytes, more than the file holds")
            offsets[key] = f.tell()
            f.seek(nbytes, os.SEEK_CUR)

        def read(storage, nbytes):
            f.seek(offsets[storage.key])
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                _fail(f"storage {storage.key!r} is cut short")
            return raw

        return _from_storages(obj, storages, read)


def _read_safetensors(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            _fail("it is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            _fail(f"its header declares {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            _fail(f"its header is not JSON ({e})")
        if not isinstance(header, dict):
            _fail("its header is not a JSON object")
        header.pop("__metadata__", None)
        start, data_size = 8 + length, size - 8 - length
        arrays = {}
        for name, entry in header.items():
            if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
                _fail(f"tensor {name!r} has no plain number dtype")
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not isinstance(shape, list) or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                _fail(f"tensor {name!r} has a malformed shape")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                    isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] <= data_size):
                _fail(f"tensor {name!r} has byte offsets outside the file")
            dtype, item = _SAFETENSORS_DTYPES[entry["dtype"]]
            count = 1
            for s in shape:
                count *= s
            if count * item != offsets[1] - offsets[0]:
                _fail(f"tensor {name!r} of shape {shape} needs {count * item} bytes but "
                      f"its range holds {offsets[1] - offsets[0]}")
            f.seek(start + offsets[0])
            raw = f.read(count * item)
            if len(raw) != count * item:
                _fail(f"tensor {name!r} is cut short")
            arrays[name] = _as_array(raw, dtype).reshape(shape).copy()
        if not arrays:
            _fail("it holds no tensors")
        return arrays


def read_state_dict(path):
    """{name: NumPy array} of a PyTorch or safetensors weight file; CheckpointError."""
    if not os.path.isfile(path):
        raise InputNotFound(f"Weight file {path!r} does not exist.")
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if head.startswith(b"PK\x03\x04"):
            arrays = _read_zip(path)
        elif head[8:9] == b"{":  # an 8-byte header length, then the JSON header
            arrays = _read_safetensors(path)
        elif head[:1] == b"\x80":  # a pickle's PROTO opcode
            arrays = _read_legacy(path)
        else:
            _fail("it is not a PyTorch (zip or legacy) or safetensors file")
    except safe_pickle.UnsafePickleError as e:
        raise CheckpointError(f"{path} was not loaded: {e}.") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path} was not loaded: {e}.") from None
    except MemoryError:
        raise CheckpointError(f"{path} was not loaded: it needs more memory than "
                              "this machine has.") from None
    return arrays
