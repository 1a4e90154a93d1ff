"""Latent store: codec round trips, checksums, missing/truncated/corrupt objects, file/memory/S3 backends."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from nirvana.cache.store import (
    CODECS,
    BlobCorrupt,
    BlobMissing,
    LatentStore,
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
