"""Blob store for cached latents and final images, over any fsspec URL (``file://`` default; ``memory://``,
``s3://`` tested).

Object format (states): ``b"NVLT"``, a format byte, a 4-byte little-endian header length, a JSON header
(codec, shape, codec parameters) and the payload. Codecs:

* ``fp32``: raw float32.  * ``fp16``: float16 (max rel. error ~5e-4).
* ``fp16-zstd``: float16, byte planes split (high bytes, then low bytes), zstd.
* ``int8-zstd``: per-channel affine uint8 quantisation (error ≤ (max − min)/510 per channel), zstd.

Invariants:
    * Keys are built from hashes of the namespace and job id and the step number; never from user text.
    * Every object has a checksum (BLAKE2b-128 of its bytes) kept in the database row; reads verify it.
    * A missing object raises :class:`BlobMissing`, a truncated/corrupt one :class:`BlobCorrupt` (callers
      treat both as a miss and drop the row); an I/O error raises :class:`BlobUnavailable` (a miss, row kept).
    * Local writes go to a temporary name and are renamed, so a reader never sees half an object.
    * The store reads, tests and deletes only URIs under its own root: same scheme (one of its filesystem's
      protocols), a path under the root, no ``.``/``..``/empty segments. A URI from a database row that is
      anything else (another scheme, bucket, prefix or directory) raises :class:`BlobForeign` — a
      :class:`BlobCorrupt`, so callers treat it as a miss and drop the row — and is logged; it is never opened
      (a tampered row must not read or delete an arbitrary file or make the store fetch an arbitrary URL).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zstandard

log = logging.getLogger(__name__)

CODECS: tuple[str, ...] = ("fp32", "fp16", "fp16-zstd", "int8-zstd")
MAGIC = b"NVLT"
FORMAT_VERSION = 1
_ZSTD_LEVEL = 3
_TMP_MARK = ".tmp-"


class BlobError(Exception):
    """A stored object could not be used."""


class BlobMissing(BlobError):
    """The object does not exist (evicted, swept, or never written)."""


class BlobCorrupt(BlobError):
    """The object exists but is truncated, corrupt or not what its row says."""


class BlobForeign(BlobCorrupt):
    """The URI lies outside this store's root (another scheme, bucket, prefix or a ``..`` escape): it is
    refused without being opened. A ``BlobCorrupt``, so callers drop the row like any unusable object."""


class BlobUnavailable(BlobError):
    """The store could not be read right now (I/O error); the object may be fine."""


@dataclass(frozen=True)
class BlobRef:
    """Where an object lives and how to check it."""

    uri: str
    codec: str
    bytes: int
    checksum: str


def checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def token(*parts: str) -> str:
    """Opaque 32-hex token of ``parts`` (used for keys, so user text never appears in them)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()


# ---------------------------------------------------------------------- codecs
def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {list(CODECS)}, got {codec!r}")


def encode_latent(latent: np.ndarray, codec: str, meta: dict[str, Any] | None = None) -> bytes:
    """Serialize a (C, H, W) float latent with ``codec``; ``meta`` (JSON-able) is stored in the header."""
    _check_codec(codec)
    x = np.ascontiguousarray(np.asarray(latent, dtype=np.float32))
    if x.ndim != 3:
        raise ValueError(f"latent must be (C, H, W), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("latent must be finite (no NaN/inf)")
    header: dict[str, Any] = {"codec": codec, "shape": list(x.shape), "meta": meta or {}}
    if codec == "fp32":
        payload = x.tobytes()
    elif codec == "fp16":
        payload = x.astype(np.float16).tobytes()
    elif codec == "fp16-zstd":
        planes = x.astype(np.float16).view(np.uint8).reshape(-1, 2).T
        payload = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(np.ascontiguousarray(planes).tobytes())
    else:  # int8-zstd
        flat = x.reshape(x.shape[0], -1)
        lo = flat.min(axis=1)
        hi = flat.max(axis=1)
        scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
        q = np.clip(np.rint((flat - lo[:, None]) / scale[:, None]), 0, 255).astype(np.uint8)
        header["lo"] = [float(v) for v in lo]
        header["scale"] = [float(v) for v in scale]
        payload = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(q.tobytes())
    header["payload_bytes"] = len(payload)
    hb = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + bytes([FORMAT_VERSION]) + struct.pack("<I", len(hb)) + hb + payload


def decode_latent(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """Inverse of :func:`encode_latent`: (float32 (C, H, W) array, header).

    Raises:
        BlobCorrupt: bad magic/version, truncated header or payload, or a payload of the wrong size.
    """
    if len(data) < 9 or data[:4] != MAGIC or data[4] != FORMAT_VERSION:
        raise BlobCorrupt("not a nirvana latent object (bad magic or version)")
    (hlen,) = struct.unpack("<I", data[5:9])
    if 9 + hlen > len(data):
        raise BlobCorrupt("truncated header")
    try:
        header = json.loads(data[9 : 9 + hlen])
        codec = header["codec"]
        shape = tuple(int(v) for v in header["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise BlobCorrupt(f"bad header: {e}") from e
    if codec not in CODECS or len(shape) != 3 or min(shape) < 1:
        raise BlobCorrupt(f"bad header: codec={codec!r} shape={shape}")
    n = int(np.prod(shape))
    payload = data[9 + hlen :]
    _expect(len(payload), int(header.get("payload_bytes", -1)))
    try:
        if codec == "fp32":
            _expect(len(payload), 4 * n)
            x = np.frombuffer(payload, dtype=np.float32).reshape(shape).copy()
        elif codec == "fp16":
            _expect(len(payload), 2 * n)
            x = np.frombuffer(payload, dtype=np.float16).reshape(shape).astype(np.float32)
        elif codec == "fp16-zstd":
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=2 * n)
            _expect(len(raw), 2 * n)
            planes = np.frombuffer(raw, dtype=np.uint8).reshape(2, n)
            x = np.ascontiguousarray(planes.T).view(np.float16).reshape(shape).astype(np.float32)
        else:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=n)
            _expect(len(raw), n)
            lo = np.asarray(header["lo"], dtype=np.float32)
            scale = np.asarray(header["scale"], dtype=np.float32)
            if lo.shape != (shape[0],) or scale.shape != (shape[0],):
                raise BlobCorrupt("int8 header has wrong channel count")
            q = np.frombuffer(raw, dtype=np.uint8).reshape(shape[0], -1).astype(np.float32)
            x = (q * scale[:, None] + lo[:, None]).reshape(shape)
    except zstandard.ZstdError as e:
        raise BlobCorrupt(f"zstd: {e}") from e
    if not np.isfinite(x).all():
        raise BlobCorrupt("decoded latent is not finite")
    return x, header


def _expect(got: int, want: int) -> None:
    if got != want:
        raise BlobCorrupt(f"payload is {got} bytes, expected {want}")


# ---------------------------------------------------------------------- store
class LatentStore:
    """Objects under one fsspec root URL.

    Args:
        url: root, e.g. ``file:///var/nirvana/blobs``, a plain path, ``memory://nirvana``, ``s3://bucket/prefix``.
        storage_options: passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for S3).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not url:
            raise ValueError("storage url must be non-empty")
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/")
        protos = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._local = "file" in protos or "local" in protos
        if self._local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Any) -> LatentStore:
        """``settings.storage_url`` or, when empty, ``<data_dir>/blobs`` on the local disk."""
        url = settings.storage_url or str(Path(settings.data_dir).absolute() / "blobs")
        return cls(url)

    def __repr__(self) -> str:
        return f"LatentStore({self.url!r})"

    # ------------------------------------------------------------------ keys
    @staticmethod
    def state_key(model_key: str, tenant: str, job_id: str, k: int) -> str:
        ns, job = token("ns", model_key, tenant), token("job", job_id)
        return f"states/{ns}/{job[:2]}/{job}/k{k:04d}.nvl"

    @staticmethod
    def image_key(model_key: str, tenant: str, job_id: str) -> str:
        ns, job = token("ns", model_key, tenant), token("job", job_id)
        return f"images/{ns}/{job[:2]}/{job}.png"

    def _path(self, key: str) -> str:
        if ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"key must be a relative path without '..', got {key!r}")
        return f"{self.root}/{key}"

    def uri_of(self, key: str) -> str:
        return str(self.fs.unstrip_protocol(self._path(key)))

    def _fs_path(self, uri: str) -> tuple[Any, str]:
        """This store's filesystem and the path of ``uri`` in it.

        Raises:
            BlobForeign: ``uri`` is not under this store's root (see the module invariants); logged.
        """
        protos = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        scheme = uri.split("://", 1)[0] if "://" in uri else ("file" if self._local else "")
        if scheme not in protos:
            raise self._foreign(uri, f"scheme {scheme or '(none)'!r} is not this store's ({'/'.join(protos)})")
        path = str(self.fs._strip_protocol(uri))
        prefix = f"{self.root}/" if self.root else ""
        rest = path[len(prefix) :] if path.startswith(prefix) else None
        if not rest:
            raise self._foreign(uri, f"not under the store's root {self.root!r}")
        if any(seg in ("", ".", "..") for seg in rest.split("/")):
            raise self._foreign(uri, "empty, '.' or '..' path segment")
        return self.fs, path

    def _foreign(self, uri: str, why: str) -> BlobForeign:
        # Why a log line: a row pointing outside the store means the database was tampered with or another
        # deployment's rows were restored here; the caller only sees a miss.
        log.warning("refusing blob URI outside %r: %.200r (%s)", self.url, uri, why)
        return BlobForeign(f"URI outside the store ({why})")

    # ------------------------------------------------------------------ raw objects
    def put_bytes(self, key: str, data: bytes, codec: str = "raw") -> BlobRef:
        """Write ``data`` at ``key`` (replacing any previous object) and return its reference."""
        path = self._path(key)
        if self._local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            tmp = f"{path}{_TMP_MARK}{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)
        return BlobRef(self.uri_of(key), codec, len(data), checksum(data))

    def get_bytes(self, uri: str, expected_checksum: str | None = None) -> bytes:
        """Read an object and verify its checksum.

        Raises:
            BlobMissing, BlobCorrupt, BlobUnavailable: see module docstring (``BlobForeign``, a ``BlobCorrupt``,
                for a URI outside the store's root).
        """
        fs, path = self._fs_path(uri)
        try:
            data = bytes(fs.cat_file(path))
        except FileNotFoundError as e:
            raise BlobMissing(uri) from e
        except Exception as e:
            raise BlobUnavailable(f"{uri}: {type(e).__name__}: {e}") from e
        if expected_checksum is not None and checksum(data) != expected_checksum:
            raise BlobCorrupt(f"{uri}: checksum mismatch ({len(data)} bytes)")
        return data

    def delete(self, uris: list[str]) -> int:
        """Delete objects (missing ones and URIs outside the store's root are skipped, the latter logged);
        returns how many delete calls succeeded (S3 does not tell a missing object from a deleted one)."""
        n = 0
        for uri in uris:
            try:
                fs, path = self._fs_path(uri)
            except BlobForeign:  # logged; never deleted
                continue
            try:
                fs.rm_file(path)
                n += 1
            except FileNotFoundError:
                pass
            except Exception as e:  # leave it for the orphan sweep
                log.warning("could not delete %s: %s", uri, e)
        return n

    def exists(self, uri: str) -> bool:
        """Whether the object exists; False for a URI outside the store (logged)."""
        try:
            fs, path = self._fs_path(uri)
        except BlobForeign:
            return False
        return bool(fs.exists(path))

    def iter_objects(self, min_age_s: float = 0.0, shard: str | None = None) -> Iterator[str]:
        """URIs of stored objects (under ``states/`` and ``images/``, plus stale temporaries) older than
        ``min_age_s``; objects whose age cannot be told are skipped. ``shard`` (two hex digits, the level after
        the namespace in every key) lists only that slice: 1/256 of the store."""
        now = time.time()
        for sub in ("states", "images"):
            base = f"{self.root}/{sub}"
            try:
                bases = [base] if shard is None else [f"{d}/{shard}" for d in self.fs.ls(base, detail=False)]
            except FileNotFoundError:
                continue
            found: dict[str, Any] = {}
            for b in bases:
                try:
                    found.update(self.fs.find(b, detail=True))
                except FileNotFoundError:
                    continue
            for path, info in found.items():
                if info.get("type", "file") != "file":
                    continue
                ts = _mtime(info)
                if ts is None or now - ts < min_age_s:
                    continue
                yield str(self.fs.unstrip_protocol(path))

    # ------------------------------------------------------------------ latents and images
    def put_latent(self, key: str, latent: np.ndarray, codec: str, meta: dict[str, Any] | None = None) -> BlobRef:
        return self.put_bytes(key, encode_latent(latent, codec, meta), codec)

    def get_latent(self, uri: str, expected_checksum: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Read and decode a latent; raises the ``BlobError`` subclasses of :meth:`get_bytes` and
        :func:`decode_latent`."""
        return decode_latent(self.get_bytes(uri, expected_checksum))


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, dt.datetime):
            return v.timestamp()
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None
