"""Read a PyTorch state_dict (.pth) into numpy arrays without importing torch.

A .pth file is a pickle, and unpickling runs whatever callables the file names. Only the handful of
globals a plain tensor state_dict needs are let through, each mapped to an inert stand-in here, so a
file that names anything else (os.system, a model class, ...) is refused before any of it runs.

Two layouts are understood:

* legacy (torch < 1.6): a sequence of pickles -- magic number, protocol version, sys_info, the
  object itself (tensors point at storages through persistent ids), the list of storage keys --
  followed by each storage's raw bytes, preceded by its element count as an 8-byte integer.
* zip (torch >= 1.6): `<prefix>/data.pkl` plus one `<prefix>/data/<key>` member per storage.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from featurepipe.core.errors import BackboneError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# storage class name -> numpy dtype of one element (bfloat16 has no numpy dtype: read as raw uint16
# and widened to float32 afterwards)
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stand-in for a `torch.<X>Storage` class: only its name and element type matter."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


_STORAGE_TYPES = {name: _StorageType(name) for name in _STORAGE_DTYPES}


class _Storage:
    """A storage whose bytes are read after the pickle that references it (legacy layout)."""

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        self.key = key
        self.storage_type = storage_type
        self.numel = numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor as pickled: a strided view of a storage, materialised once the storages are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    # _rebuild_tensor_v2 adds requires_grad, backward_hooks and (torch >= 2) metadata; none of
    # them changes the values.
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor does not reference a storage")
    if not (_is_int(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(_is_int(v) for v in size + stride)):
        raise pickle.UnpicklingError("malformed tensor metadata")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("parameter does not wrap a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file)
        self._source = source
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise BackboneError(
                f"{self._source}: refusing to unpickle global {module}.{name}; only plain tensor "
                "state_dicts can be read (is this a whole pickled model or an untrusted file?)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
            raise BackboneError(f"{self._source}: unsupported persistent object {kind!r}; "
                                "only tensor storages are allowed")
        if self._legacy:
            if len(pid) != 6:
                raise pickle.UnpicklingError(f"malformed storage reference of length {len(pid)}")
            _, storage_type, key, _location, numel, view_metadata = pid
            if view_metadata is not None:
                raise BackboneError(f"{self._source}: storage views are not supported")
        else:
            if len(pid) != 5:
                raise pickle.UnpicklingError(f"malformed storage reference of length {len(pid)}")
            _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_int(numel)
                and numel >= 0):
            raise pickle.UnpicklingError("malformed storage reference")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type, numel)
        elif storage.storage_type is not storage_type or storage.numel != numel:
            raise pickle.UnpicklingError(f"storage {key} is referenced with conflicting types or sizes")
        return storage


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state_dict file, by key, as C-contiguous numpy arrays.

    Both the legacy (pre-1.6) and the zip layout are accepted. Raises BackboneError naming the file
    when it is truncated, malformed, not a flat tensor state_dict, or names a disallowed global.
    """
    path = Path(path)
    source = str(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path, source)
        with open(path, "rb") as f:
            return _read_legacy(f, source)
    except BackboneError:
        raise
    except OSError as exc:
        raise BackboneError(f"{source}: cannot read PyTorch weights: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, zipfile.BadZipFile) as exc:
        raise BackboneError(f"{source}: not a readable PyTorch state_dict (truncated or corrupt?): "
                            f"{type(exc).__name__}: {exc}") from exc


def _read_legacy(f, source: str) -> dict[str, np.ndarray]:
    # The header pickles hold only ints and dicts; still go through the restricted unpickler so
    # a hostile header cannot run code either.
    def load_plain():
        return _RestrictedUnpickler(f, source, {}, legacy=True).load()

    magic = load_plain()
    if magic != _LEGACY_MAGIC:
        raise BackboneError(f"{source}: not a PyTorch file (bad magic number)")
    protocol = load_plain()
    if protocol != _LEGACY_PROTOCOL:
        raise BackboneError(f"{source}: unsupported legacy PyTorch protocol version {protocol!r}")
    sys_info = load_plain()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise BackboneError(f"{source}: only little-endian PyTorch files are supported")

    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(f, source, storages, legacy=True).load()
    keys = load_plain()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise pickle.UnpicklingError("storage key list is malformed")
    if len(set(keys)) != len(keys) or set(keys) != set(storages):
        raise BackboneError(f"{source}: storage key list does not match the storages the tensors use")

    for key in keys:
        storage = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise BackboneError(f"{source}: truncated file (storage {key} is missing)")
        (numel,) = struct.unpack("<q", header)
        if numel != storage.numel:
            raise BackboneError(f"{source}: storage {key} holds {numel} elements, expected {storage.numel}")
        nbytes = numel * storage.storage_type.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise BackboneError(f"{source}: truncated file (storage {key} has {len(raw)} of {nbytes} bytes)")
        storage.data = np.frombuffer(raw, dtype=storage.storage_type.dtype)
    if f.read(1):
        raise BackboneError(f"{source}: unexpected data after the last storage")
    return _materialise(obj, source)


def _read_zip(path: Path, source: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise BackboneError(f"{source}: zip archive without exactly one <name>/data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise BackboneError(f"{source}: only little-endian PyTorch files are supported")
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), source, storages, legacy=False).load()
        for key, storage in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise BackboneError(f"{source}: storage {key} is missing from the archive")
            raw = archive.read(member)
            nbytes = storage.numel * storage.storage_type.dtype.itemsize
            if len(raw) != nbytes:
                raise BackboneError(f"{source}: storage {key} has {len(raw)} bytes, expected {nbytes}")
            storage.data = np.frombuffer(raw, dtype=storage.storage_type.dtype)
    return _materialise(obj, source)


def _materialise(obj, source: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise BackboneError(f"{source}: expected a state_dict (a mapping of names to tensors), "
                            f"found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, ref in obj.items():
        if not isinstance(name, str) or not isinstance(ref, _TensorRef):
            raise BackboneError(f"{source}: entry {name!r} is not a tensor; only flat state_dicts "
                                "of tensors are supported")
        out[name] = _tensor_to_numpy(ref, name, source)
    return out


def _tensor_to_numpy(ref: _TensorRef, name: str, source: str) -> np.ndarray:
    # Checked again here, not only in _rebuild_tensor: a pickle BUILD opcode can overwrite the
    # attributes of any object it has already created.
    storage = ref.storage
    if not (isinstance(storage, _Storage) and isinstance(storage.data, np.ndarray)
            and isinstance(storage.storage_type, _StorageType)
            and _is_int(ref.offset) and isinstance(ref.size, tuple) and isinstance(ref.stride, tuple)
            and len(ref.size) == len(ref.stride) and all(_is_int(v) for v in ref.size + ref.stride)):
        raise BackboneError(f"{source}: tensor {name} is malformed")
    data = storage.data
    if any(v < 0 for v in ref.size) or any(v < 0 for v in ref.stride) or ref.offset < 0:
        raise BackboneError(f"{source}: tensor {name} has negative sizes, strides or offset")
    count = int(np.prod(ref.size, dtype=np.int64))
    if count:
        # as_strided reads raw memory: prove every element it can touch lies inside the storage
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= data.size:
            raise BackboneError(f"{source}: tensor {name} reaches past the end of its storage")
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[ref.offset:], shape=ref.size, strides=tuple(s * itemsize for s in ref.stride), writeable=False
        )
        array = np.array(view, order="C")
    else:
        array = np.zeros(ref.size, dtype=data.dtype)
    if storage.storage_type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


__all__ = ["read_state_dict"]
