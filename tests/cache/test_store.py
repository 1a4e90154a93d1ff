"""Latent store: codec round trips, checksums, missing/truncated/corrupt objects, file/memory/S3 backends, and
URIs outside the store's root refused (a miss, never a read or delete of another object)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from nirvana.cache.store import (
    CODECS,
    BlobCorrupt,
    BlobForeign,
    BlobMissing,
    LatentStore,
    checksum,
    decode_latent,
    encode_latent,
)


def latent(seed: int = 0, shape: tuple[int, int, int] = (4, 16, 16)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    x[1] *= 5.0  # channels with different ranges (per-channel quantisation matters)
    x[2] += 3.0
    return x


@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip(codec: str) -> None:
    x = latent()
    data = encode_latent(x, codec, {"step": 5})
    y, header = decode_latent(data)
    assert y.shape == x.shape and y.dtype == np.float32 and header["meta"] == {"step": 5}
    err = np.abs(y - x)
    if codec == "fp32":
        assert np.array_equal(x, y)
    elif codec.startswith("fp16"):
        assert (err <= np.abs(x) * 2**-11 + 1e-7).all()
    else:
        rng_c = x.reshape(4, -1).max(1) - x.reshape(4, -1).min(1)
        assert (err.reshape(4, -1).max(1) <= rng_c / 510 * 1.0001 + 1e-7).all()


def test_codec_sizes() -> None:
    # A smooth latent (like a partially denoised one) compresses well.
    g = np.linspace(0, 1, 64, dtype=np.float32)
    x = np.stack([np.outer(g, g) * (c + 1) for c in range(4)]).astype(np.float32)
    sizes = {c: len(encode_latent(x, c)) for c in CODECS}
    raw = x.nbytes
    assert sizes["fp32"] > raw and sizes["fp16"] < raw * 0.51 + 200
    assert sizes["fp16-zstd"] < sizes["fp16"] and sizes["int8-zstd"] < sizes["fp16-zstd"]


def test_constant_channel_and_validation() -> None:
    x = np.zeros((2, 4, 4), np.float32)
    x[1] = 7.5
    y, _ = decode_latent(encode_latent(x, "int8-zstd"))
    assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="codec"):
        encode_latent(x, "bf16")
    with pytest.raises(ValueError, match="C, H, W"):
        encode_latent(np.zeros((4, 4), np.float32), "fp16")
    with pytest.raises(ValueError, match="finite"):
        encode_latent(np.full((1, 2, 2), np.nan, np.float32), "fp16")


@pytest.mark.parametrize("codec", CODECS)
def test_decode_rejects_damage(codec: str) -> None:
    data = encode_latent(latent(1), codec)
    for bad in (data[: len(data) // 2], data[:8], b"XXXX" + data[4:], data + b"\x00" * 3):
        with pytest.raises(BlobCorrupt):
            decode_latent(bad)


def _roundtrip_store(store: LatentStore) -> None:
    x = latent(2)
    key = LatentStore.state_key("model-a", "tenant-1", "job-1", 5)
    ref = store.put_latent(key, x, "fp16-zstd")
    assert ref.uri.startswith(store.fs.unstrip_protocol(store.root)[:4]) and store.exists(ref.uri)
    y, _ = store.get_latent(ref.uri, ref.checksum)
    assert np.allclose(x, y, rtol=1e-3, atol=1e-3)
    # Overwrite with different bytes: the old checksum no longer matches → corrupt, not silently wrong.
    store.put_latent(key, latent(3), "fp16-zstd")
    with pytest.raises(BlobCorrupt):
        store.get_latent(ref.uri, ref.checksum)
    # Truncation is caught by the checksum (and by the decoder without one).
    path = store._fs_path(ref.uri)[1]
    store.fs.pipe_file(path, encode_latent(x, "fp16-zstd")[:-10])
    with pytest.raises(BlobCorrupt):
        store.get_latent(ref.uri, ref.checksum)
    with pytest.raises(BlobCorrupt):
        store.get_latent(ref.uri)
    assert store.delete([ref.uri]) == 1
    store.delete([ref.uri])  # deleting a missing object is not an error
    with pytest.raises(BlobMissing):
        store.get_latent(ref.uri)
    img = store.put_bytes(LatentStore.image_key("model-a", "tenant-1", "job-1"), b"\x89PNG...", "png")
    assert store.get_bytes(img.uri, img.checksum) == b"\x89PNG..."
    assert img.uri in set(store.iter_objects(0.0))
    assert list(store.iter_objects(3600.0)) == []


def test_file_store(tmp_path: Path) -> None:
    store = LatentStore(f"file://{tmp_path}/blobs")
    _roundtrip_store(store)
    # No temporaries are left behind by atomic writes.
    assert not [p for p in (tmp_path / "blobs").rglob("*") if ".tmp-" in p.name]


def test_memory_store() -> None:
    _roundtrip_store(LatentStore(f"memory://nirvana-test-{uuid.uuid4().hex[:8]}"))


def test_s3_store(s3_endpoint: str) -> None:
    import s3fs

    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**opts)
    bucket = f"nirvana-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    _roundtrip_store(LatentStore(f"s3://{bucket}/cache", storage_options=opts))


def test_keys_never_contain_user_text() -> None:
    evil = "../../etc/passwd a cat, 4k"
    for key in (LatentStore.state_key(evil, evil, evil, 5), LatentStore.image_key(evil, evil, evil)):
        assert ".." not in key and "cat" not in key and " " not in key
    assert LatentStore.state_key("m", "t", "j", 5) != LatentStore.state_key("m", "t2", "j", 5)
    with pytest.raises(ValueError, match="key"):
        LatentStore("memory://x")._path("../escape")


def _assert_refused(store: LatentStore, uri: str, caplog: pytest.LogCaptureFixture) -> None:
    """``uri`` is refused without being opened: read → BlobForeign (a BlobCorrupt: callers drop the row, a
    miss), exists → False, delete → skipped; each logged."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="nirvana.cache.store"):
        with pytest.raises(BlobForeign) as e:
            store.get_bytes(uri)
        assert isinstance(e.value, BlobCorrupt) and (not uri or uri not in str(e.value))  # never echoes the URI
        with pytest.raises(BlobCorrupt):
            store.get_latent(uri, "0" * 32)
        assert store.exists(uri) is False
        assert store.delete([uri]) == 0
    assert sum("refusing blob URI outside" in r.getMessage() for r in caplog.records) == 4, uri


def test_file_store_refuses_uris_outside_its_root(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = LatentStore(f"file://{tmp_path}/blobs")
    secret = tmp_path / "secret.nvl"
    secret.write_bytes(encode_latent(latent(5), "fp32"))  # a perfectly valid object, just not the store's
    (tmp_path / "blobs-evil").mkdir()
    (tmp_path / "blobs-evil" / "x").write_bytes(b"evil")
    ok = store.put_bytes("states/ab/x.nvl", b"mine")
    assert store.get_bytes(ok.uri, ok.checksum) == b"mine"
    for uri in (
        f"file://{secret}",
        str(secret),  # no scheme: a local path
        f"file://{tmp_path}/blobs/../secret.nvl",
        f"file://{tmp_path}/blobs/states/../../secret.nvl",
        f"file://{tmp_path}/blobs-evil/x",  # shares the root's name as a prefix
        f"file://{tmp_path}/blobs",  # the root itself
        f"file://{tmp_path}/blobs/",
        f"file://{tmp_path}/blobs/states//x.nvl",
        f"file://{tmp_path}/blobs/./states/ab/x.nvl",
        "file:///etc/passwd",
        "memory://nirvana/states/x.nvl",
        "http://127.0.0.1:1/states/x.nvl",
        "s3://bucket/states/x.nvl",
        "",
    ):
        _assert_refused(store, uri, caplog)
    assert secret.exists() and (tmp_path / "blobs-evil" / "x").exists()  # nothing outside was deleted
    assert store.get_bytes(ok.uri, ok.checksum) == b"mine"


def test_memory_store_refuses_uris_outside_its_root(caplog: pytest.LogCaptureFixture) -> None:
    name = f"nirvana-test-{uuid.uuid4().hex[:8]}"
    store, other = LatentStore(f"memory://{name}"), LatentStore(f"memory://{name}-other")
    theirs = other.put_bytes("states/ab/x.nvl", b"theirs")
    for uri in (
        theirs.uri,
        f"memory://{name}/../{name}-other/states/ab/x.nvl",
        f"memory://{name}",
        f"file:///{name}/states/ab/x.nvl",
    ):
        _assert_refused(store, uri, caplog)
    assert other.get_bytes(theirs.uri, theirs.checksum) == b"theirs"


def test_s3_store_refuses_other_buckets_and_prefixes(s3_endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    import s3fs

    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**opts)
    bucket, other = f"nirvana-{uuid.uuid4().hex[:8]}", f"nirvana-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.mkdir(other)
    store = LatentStore(f"s3://{bucket}/cache", storage_options=opts)
    fs.pipe_file(f"{other}/cache/states/x.nvl", b"other bucket")
    fs.pipe_file(f"{bucket}/elsewhere/x.nvl", b"other prefix")
    mine = store.put_bytes("states/ab/x.nvl", b"mine")
    assert store.get_bytes(mine.uri, mine.checksum) == b"mine"
    for uri in (
        f"s3://{other}/cache/states/x.nvl",
        f"s3://{bucket}/elsewhere/x.nvl",
        f"s3://{bucket}/cache/../elsewhere/x.nvl",
        f"s3://{bucket}/cache-evil/x.nvl",
        f"file:///{bucket}/cache/states/ab/x.nvl",
    ):
        _assert_refused(store, uri, caplog)
    assert fs.cat_file(f"{other}/cache/states/x.nvl") == b"other bucket"
    assert fs.cat_file(f"{bucket}/elsewhere/x.nvl") == b"other prefix"


def test_a_row_pointing_outside_the_store_is_a_miss(pg_url: str, tmp_path: Path) -> None:
    """A tampered row (its URI and checksum pointing at a valid object outside the root) is a cache miss: the
    row is dropped, the outside object neither read nor deleted."""
    from nirvana.cache.core import Namespace
    from tests.cache.helpers import make_cache, request, states, unit

    ns = Namespace("model-a-32x32-ddim", f"tenant-{uuid.uuid4().hex[:8]}")
    outside = tmp_path / "outside.nvl"
    data = encode_latent(np.zeros((3, 8, 8), np.float32), "fp16-zstd")
    outside.write_bytes(data)
    with make_cache(pg_url, LatentStore(str(tmp_path / "blobs")), eviction="paper", budget_bytes=10**12) as cache:
        emb = unit(np.random.default_rng(9))
        req = request(emb, ns)
        cache.record(f"job-{uuid.uuid4().hex}", req, states(ns.model_key, [5, 10]), b"\x89PNG-x", cache.lookup(req))
        hit = cache.lookup(request(emb, ns, seed=3))
        row = cache.index.state_row(hit.state_id or -1)
        assert hit.tier == "approximate" and row is not None and row.uri is not None
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute(
                "UPDATE cache_blobs SET uri = %s, checksum = %s WHERE id = %s",
                (f"file://{outside}", checksum(data), row.blob_id),
            )
        assert cache.load_state(hit) is None
        assert cache.index.state_row(hit.state_id or -1) is None  # dropped like a corrupt object
        assert outside.read_bytes() == data
