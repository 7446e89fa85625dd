"""Content digests of saved files: a flipped byte in any tensor or value of a checkpoint is found when it is loaded.

Neither format checks its own bytes: `torch.load` ignores the CRCs of its zip archive and safetensors has no
checksum, so bit rot on a disk or in a copy went unnoticed (a run resumed from damaged weights, its loss doubled;
samples were drawn from them). A digest is computed from the object in memory when it is saved, stored inside the
file (so it travels with every copy), and recomputed from what was loaded:

    {"algorithm": "crc32c", "version": 1,
     "tensors": [[path, crc], ...],  one per tensor or numpy array ("model.blocks.3.pwconv1.weight"), over its
                                     dtype, shape and bytes: a mismatch names the damaged tensor
     "values":  [[key, crc], ...]}   one per top-level key, over the structure below it (keys, lengths, the
                                     tensors' dtypes and shapes) and every other value (ints, floats, strings, ...)

Dicts are walked in sorted key order, so the digest does not depend on insertion order; lists and tuples count as
the same sequence (a serialiser may turn one into the other, and a file must not look damaged for that). Tensors
of every dtype (bf16 included) are read as their raw bytes, CUDA tensors copied to the host one at a time.
CRC-32C (google_crc32c: hardware instructions, several GB/s) detects every error burst up to 32 bits and other
damage with probability 1 - 2^-32; it is no defence against deliberate tampering (compare `sha256_file` of the
file with a trusted record for that).

A `.pt` checkpoint holds its digest under the top-level key "digest" (`stamp`, `check`), a safetensors file as
JSON in its header metadata (`stamp_metadata`, `check_safetensors`; `check_safetensors(None, ...)` checks the
metadata alone, from the header). A mismatch raises `DamagedCheckpoint`, one line naming the file, the damaged
entry and what to do. A file written before digests (none stored) is returned unchecked, with the reason, for the
caller's note (`note_unverified`, once per file) once the file has passed its other checks: a file refused for
another reason gets its one error line and no note beside it.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
from typing import Any, Mapping, Optional

import google_crc32c
import numpy as np
import torch

from fcdm_common.cli import UserError

ALGORITHM = "crc32c"
VERSION = 1
DIGEST_KEY = "digest"  # the top-level key of a .pt checkpoint, the metadata key of a safetensors file


class DamagedCheckpoint(UserError):
    """A file whose contents no longer match the digest written with it (`detail` names the damaged entry)."""

    def __init__(self, what: str, path: str | os.PathLike, detail: str, fix: str):
        self.what, self.fix = what, fix  # "checkpoint", "EMA export", ...; what to do about it
        self.path = path  # the damaged file
        self.detail = detail  # e.g. "tensor 'model.blocks.3.pwconv1.weight' does not match its crc32c digest"
        super().__init__(f"{what} {path} is damaged: {detail} (its bytes changed after it was written, on disk or "
                         f"in a copy); {fix}")

    def __reduce__(self):  # picklable (e.g. across processes) despite the four-argument constructor
        return type(self), (self.what, self.path, self.detail, self.fix)


class NoDigestWarning(UserWarning):
    """A file loaded without a check for damage: it was written before digests (or by another program)."""


# ---------------------------------------------------------------------------------- computing
def _blob(tag: bytes, data: bytes) -> bytes:
    """A length-prefixed field: no two different sequences of fields encode to the same bytes."""
    return tag + len(data).to_bytes(8, "little") + data


def _scalar(value: Any, path: tuple) -> bytes:
    if value is None:
        return _blob(b"N", b"")
    if isinstance(value, bool):
        return _blob(b"B", b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return _blob(b"I", str(int(value)).encode())
    if isinstance(value, float):
        return _blob(b"F", struct.pack("<d", value))
    if isinstance(value, str):
        return _blob(b"S", value.encode("utf-8", "surrogatepass"))
    if isinstance(value, (bytes, bytearray)):
        return _blob(b"Y", bytes(value))
    if isinstance(value, np.generic):
        return _blob(b"G", value.dtype.str.encode() + b":" + np.asarray(value).tobytes())
    if isinstance(value, torch.dtype):
        return _blob(b"T", str(value).encode())
    if isinstance(value, torch.device):
        return _blob(b"V", str(value).encode())
    raise TypeError(f"cannot compute the digest of {type(value).__name__} at {display_path(path)!r}")


def _array_crc(x, path: tuple) -> tuple[bytes, int]:
    """(header: kind, dtype and shape; crc32c of the header and the raw bytes) of a tensor or numpy array."""
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided or x.is_quantized or x.is_meta:
            raise TypeError(f"cannot compute the digest of a {x.layout} tensor at {display_path(path)!r}")
        header = _blob(b"X", f"{x.dtype}{tuple(x.shape)}".encode())
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # one tensor at a time: no second copy of the whole state in host memory
        data = t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy()
    else:
        if x.dtype.hasobject:
            raise TypeError(f"cannot compute the digest of an object array at {display_path(path)!r}")
        header = _blob(b"A", f"{x.dtype.str}{x.shape}".encode())
        data = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    return header, google_crc32c.extend(google_crc32c.value(header), data)


def _sorted_keys(mapping: Mapping) -> list:
    try:
        return sorted(mapping, key=lambda k: (type(k).__name__, k))
    except TypeError:  # keys of one type that do not compare (e.g. tuples of mixed types)
        raise TypeError(f"cannot compute the digest of a dict with keys {list(mapping)[:5]!r}") from None


def _walk(obj: Any, path: tuple, out: list, tensors: list) -> None:
    """Append the encoding of `obj` (structure and plain values; a tensor's header) to `out` and one
    [path, crc] per tensor or array to `tensors`, in a fixed order (sorted keys)."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        header, crc = _array_crc(obj, path)
        out.append(header)
        tensors.append([display_path(path), crc])
    elif isinstance(obj, Mapping):
        out.append(_blob(b"D", str(len(obj)).encode()))
        for k in _sorted_keys(obj):
            out.append(_scalar(k, path))
            _walk(obj[k], path + (k,), out, tensors)
    elif isinstance(obj, (list, tuple)):
        out.append(_blob(b"L", str(len(obj)).encode()))
        for i, v in enumerate(obj):
            _walk(v, path + (i,), out, tensors)
    else:
        out.append(_scalar(obj, path))


def display_path(path: tuple) -> str:
    """The name of a place in a digest: "model.blocks.3.pwconv1.weight" for ("model", "blocks.3.pwconv1.weight")."""
    return ".".join(str(k) for k in path) if path else "(root)"


def content_digest(obj: Any) -> dict:
    """The digest of `obj` (see the module docstring): nested dicts, lists and tuples of tensors, numpy arrays
    and plain values (None, bool, int, float, str, bytes, numpy scalars, torch dtypes and devices); another
    type raises TypeError naming its place."""
    tensors: list = []
    values: list = []
    groups = [(k, obj[k]) for k in _sorted_keys(obj)] if isinstance(obj, Mapping) else [(None, obj)]
    for key, value in groups:
        out = [] if key is None else [_scalar(key, ())]
        _walk(value, () if key is None else (key,), out, tensors)
        values.append([display_path(() if key is None else (key,)), google_crc32c.value(b"".join(out))])
    return {"algorithm": ALGORITHM, "version": VERSION, "tensors": tensors, "values": values}


# ---------------------------------------------------------------------------------- comparing
def _entries(stored: Any, name: str) -> Optional[list]:
    """The [[path, crc], ...] list `name` of a stored digest as tuples, or None when it is malformed."""
    entries = stored.get(name) if isinstance(stored, Mapping) else None
    if not isinstance(entries, (list, tuple)):
        return None
    pairs = [tuple(e) for e in entries if isinstance(e, (list, tuple)) and len(e) == 2]
    ok = len(pairs) == len(entries) and all(isinstance(p, str) and isinstance(c, int) for p, c in pairs)
    return pairs if ok else None


def _list_difference(kind: str, stored: list, actual: list) -> Optional[str]:
    """What differs between two [(path, crc), ...] lists, naming the first entry (and counting the others)."""
    if stored == actual:
        return None
    stored_paths, actual_paths = [p for p, _ in stored], [p for p, _ in actual]
    if stored_paths == actual_paths:
        bad = [p for (p, a), (_, b) in zip(stored, actual) if a != b]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return f"{kind} {bad[0]!r} does not match its {ALGORITHM} digest{more}"
    known, found = set(stored_paths), set(actual_paths)
    missing = [p for p in stored_paths if p not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"{kind} {missing[0]!r} listed in its digest is missing{more}"
    extra = [p for p in actual_paths if p not in known]
    if extra:
        return f"it holds {kind} {extra[0]!r}, which its digest does not list"
    return f"its {kind}s are not in the order of its digest"


def digest_difference(stored: Any, actual: dict, tensors: bool = True, values_are: str = "entry") -> Optional[str]:
    """None when the stored digest agrees with `actual` (`content_digest` of what was loaded); else a phrase
    naming the first damaged entry (a top-level value is called `values_are`). `tensors=False` compares the
    values only (a header read without the data)."""
    stored_tensors, stored_values = _entries(stored, "tensors"), _entries(stored, "values")
    if stored_tensors is None or stored_values is None:
        return "its digest is unreadable"
    kinds = [("tensor", stored_tensors, actual["tensors"])] if tensors else []
    kinds.append((values_are, stored_values, actual["values"]))
    for kind, s, a in kinds:
        problem = _list_difference(kind, s, [tuple(e) for e in a])
        if problem:
            return problem
    return None


def _checkable(stored: Any) -> bool:
    """A digest this version computes the same way (a later algorithm or version is not checked)."""
    return isinstance(stored, Mapping) and stored.get("algorithm") == ALGORITHM and stored.get("version") == VERSION


# ---------------------------------------------------------------------------------- files
NO_DIGEST = "it has no content digest (written before checkpoints carried one, or by another program)"
_noted: set = set()  # files already noted as unverified (once per file and process)


def note_unverified(what: str, path: str | os.PathLike, why: str = NO_DIGEST) -> None:
    """Warn once per file that it was loaded without a check for damage (`why`: as `check` returns it)."""
    key = os.path.abspath(path)
    if key in _noted:
        return
    _noted.add(key)
    warnings.warn(f"{what} {path} was loaded without a check for damage: {why}", NoDigestWarning, stacklevel=3)


def stamp(obj: dict) -> dict:
    """`obj` (a checkpoint dict) with its digest under DIGEST_KEY (an old digest there is replaced)."""
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    return {**body, DIGEST_KEY: content_digest(body)}


def check(obj: Any, path: str | os.PathLike, what: str, fix: str) -> tuple[Any, Optional[str]]:
    """(`obj` as loaded from `path` without its digest, None) after checking it: DamagedCheckpoint (naming the
    `what` at `path`, ending with `fix`) when they differ. (obj, why it was not checked) for a dict without a
    digest this version can check; (obj, None) for anything else (no checkpoint: the caller refuses it)."""
    if not isinstance(obj, dict):
        return obj, None
    if DIGEST_KEY not in obj:
        return obj, NO_DIGEST
    stored = obj[DIGEST_KEY]
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    if not _checkable(stored):
        return body, f"its digest is {_describe(stored)}, which this version cannot check"
    problem = digest_difference(stored, content_digest(body))
    if problem:
        raise DamagedCheckpoint(what, path, problem, fix)
    return body, None


def _describe(stored: Any) -> str:
    if not isinstance(stored, Mapping):
        return f"a {type(stored).__name__}"
    return f"{stored.get('algorithm')!r} version {stored.get('version')!r}"


def _safetensors_digest(state: Optional[dict], metadata: dict) -> dict:
    """Tensors from the state, values from the metadata (str -> str, without the digest itself)."""
    digest = content_digest(state) if state is not None else {"algorithm": ALGORITHM, "version": VERSION,
                                                                 "tensors": []}
    digest["values"] = content_digest({k: v for k, v in metadata.items() if k != DIGEST_KEY})["values"]
    return digest


def stamp_metadata(state: dict, metadata: Optional[dict] = None) -> dict:
    """The header metadata (values as strings, as safetensors stores them) of a safetensors file of `state`,
    with the digest of both under DIGEST_KEY (compact JSON)."""
    meta = {k: str(v) for k, v in (metadata or {}).items() if k != DIGEST_KEY}
    meta[DIGEST_KEY] = json.dumps(_safetensors_digest(state, meta), separators=(",", ":"))
    return meta


def check_safetensors(state: Optional[dict], metadata: Optional[dict], path: str | os.PathLike, what: str,
                      fix: str) -> Optional[str]:
    """Check a safetensors file's tensors `state` (None: its header metadata alone) against the digest in its
    `metadata`: DamagedCheckpoint when they differ. None when checked, else why not (no digest this version
    can check), for `note_unverified`."""
    metadata = metadata or {}
    raw = metadata.get(DIGEST_KEY)
    if raw is None:
        return NO_DIGEST
    try:
        stored = json.loads(raw)
    except ValueError:
        raise DamagedCheckpoint(what, path, "its digest (in the header metadata) is unreadable", fix) from None
    if not _checkable(stored):
        return f"its digest is {_describe(stored)}, which this version cannot check"
    problem = digest_difference(stored, _safetensors_digest(state, metadata), tensors=state is not None,
                                values_are="metadata entry")
    if problem:
        raise DamagedCheckpoint(what, path, problem, fix)
    return None
