"""Writers of PyTorch (zip and legacy) and safetensors files, for tests, without PyTorch.

The pickles are emitted opcode by opcode as torch.save writes them (checked
against files of torch 2.13): an OrderedDict whose values are
torch._utils._rebuild_tensor_v2(persistent storage id, offset, size, stride,
False, OrderedDict()), then a BUILD with the state dict's `_metadata`.
`hostile` hooks let a test replace a part with something a real file never has.
"""

import json
import struct
import zipfile

import numpy as np

_STORAGE = {"<f4": "FloatStorage", "<f8": "DoubleStorage", "<f2": "HalfStorage",
            "<i8": "LongStorage", "<i4": "IntStorage", "|u1": "ByteStorage"}
_SAFE = {"<f4": "F32", "<f8": "F64", "<f2": "F16", "<i8": "I64", "<i4": "I32", "|u1": "U8"}


class Pickle:
    """A protocol-2 pickle written one opcode at a time."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")

    def global_(self, module, name):
        self.out += b"c" + f"{module}\n{name}\n".encode()

    def value(self, v):
        out = self.out
        if isinstance(v, bool):
            out += b"\x88" if v else b"\x89"
        elif v is None:
            out += b"N"
        elif isinstance(v, int):
            if -2**31 <= v < 2**31:
                out += b"J" + struct.pack("<i", v)
            else:
                raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                out += b"\x8a" + bytes([len(raw)]) + raw
        elif isinstance(v, float):
            out += b"G" + struct.pack(">d", v)
        elif isinstance(v, str):
            raw = v.encode()
            out += b"X" + struct.pack("<I", len(raw)) + raw
        elif isinstance(v, tuple):
            out += b"("
            for item in v:
                self.value(item)
            out += b"t"
        elif isinstance(v, list):
            out += b"]("
            for item in v:
                self.value(item)
            out += b"e"
        elif isinstance(v, dict):
            out += b"}("
            for k, item in v.items():
                self.value(k)
                self.value(item)
            out += b"u"
        elif callable(v):
            v(self)
        else:
            raise TypeError(type(v))

    def ordered_dict(self, items, metadata=True):
        self.global_("collections", "OrderedDict")
        self.out += b")R("
        for k, item in items.items():
            self.value(k)
            self.value(item)
        self.out += b"u"
        if metadata:
            self.out += b"}"
            self.value("_metadata")
            self.global_("collections", "OrderedDict")
            self.out += b")R("
            self.value("")
            self.value({"version": 1})
            self.out += b"us"  # SETITEMS of the metadata, SETITEM into the state
            self.out += b"b"   # BUILD

    def bytes(self):
        return bytes(self.out + b".")


def tensor_writer(key, array, storage=None, numel=None, size=None, stride=None, offset=0,
                  location="cpu"):
    """A callable that writes `_rebuild_tensor_v2(...)` for `array` stored under `key`."""
    array = np.asarray(array)
    storage = storage or _STORAGE[array.dtype.str]
    numel = array.size if numel is None else numel
    size = tuple(array.shape) if size is None else size
    if stride is None:
        stride = tuple(s // array.itemsize for s in np.ascontiguousarray(array).strides) \
            if array.ndim else ()

    def write(p):
        p.global_("torch._utils", "_rebuild_tensor_v2")
        p.out += b"("
        p.out += b"("  # the persistent id
        p.value("storage")
        p.global_("torch", storage) if isinstance(storage, str) else storage(p)
        p.value(key)
        p.value(location)
        p.value(numel)
        p.out += b"tQ"
        p.value(offset)
        p.value(tuple(size))
        p.value(tuple(stride))
        p.value(False)
        p.global_("collections", "OrderedDict")
        p.out += b")R"
        p.out += b"tR"
    return write


def state_pickle(state, wrap=None, extra=None):
    """The pickle of a state dict {name: array}; `wrap` nests it under that key."""
    writers = {name: tensor_writer(str(i), a) for i, (name, a) in enumerate(state.items())}
    if extra:
        writers.update(extra)
    p = Pickle()
    if wrap:
        p.out += b"}("
        p.value("epoch")
        p.value(3)
        p.value(wrap)
        p.ordered_dict(writers)
        p.out += b"u"
    else:
        p.ordered_dict(writers)
    return p.bytes()


def _raw(array):
    return np.ascontiguousarray(array).tobytes()


def write_zip(path, state, wrap=None, pickle_bytes=None, storages=None, name="archive"):
    """A torch.save zip file; `pickle_bytes` / `storages` replace the real parts."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", pickle_bytes or state_pickle(state, wrap))
        z.writestr(f"{name}/byteorder", "little")
        stored = storages if storages is not None else {
            str(i): _raw(a) for i, a in enumerate(state.values())}
        for key, raw in stored.items():
            z.writestr(f"{name}/data/{key}", raw)
        z.writestr(f"{name}/version", "3\n")
    return path


def write_legacy(path, state, pickle_bytes=None, counts=None):
    """A legacy (non-zip) torch.save file; `counts` replace the stored element counts."""
    out = bytearray()
    for value in (0x1950A86A20F9469CFC6C, 1001,
                  {"protocol_version": 1001, "little_endian": True,
                   "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        p = Pickle()
        p.value(value)
        out += p.bytes()
    out += pickle_bytes or state_pickle(state)
    keys = [str(i) for i in range(len(state))]
    p = Pickle()
    p.value(keys)
    out += p.bytes()
    for i, array in enumerate(state.values()):
        count = array.size if counts is None else counts[i]
        out += struct.pack("<q", count) + _raw(array)
    with open(path, "wb") as f:
        f.write(out)
    return path


def write_safetensors(path, state, header=None):
    """A .safetensors file; `header` replaces the real one."""
    entries, offset, blobs = {}, 0, []
    for name, array in state.items():
        raw = _raw(array)
        entries[name] = {"dtype": _SAFE[np.asarray(array).dtype.str],
                         "shape": list(np.shape(array)), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    entries["__metadata__"] = {"format": "pt"}
    text = json.dumps(header if header is not None else entries).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path
