"""MiniLM embedder (the packaged all-MiniLM-L6-v2, offline): shape, norm, batching, similarity sanity."""

from __future__ import annotations

import numpy as np
import pytest

from nirvana.cache.embedder import Embedder, MiniLMEmbedder


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder(batch_size=4)


def test_minilm_embeddings(embedder: MiniLMEmbedder) -> None:
    prompts = [
        "a red cube on green grass, highly detailed",
        "a red cube on green grass, highly detailed, 4k",
        "portrait of an old sailor, oil painting",
        "a red cube on grass",
        "cyberpunk city at night, neon",
    ]
    x = embedder.embed(prompts)
    assert x.shape == (5, 384) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    sims = x @ x.T
    assert sims[0, 1] > 0.9 and sims[0, 3] > 0.75 and sims[0, 2] < 0.4
    # Batching does not change results; one at a time equals the batch.
    single = np.concatenate([embedder.embed([p]) for p in prompts])
    assert np.allclose(single, x, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    assert isinstance(embedder, Embedder) and embedder.space == "minilm-l6-v2"


def test_shares_a_loaded_model(embedder: MiniLMEmbedder) -> None:
    other = MiniLMEmbedder(model=embedder.model)
    assert other.model is embedder.model
    with pytest.raises(ValueError, match="list"):
        other.embed("a single string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        MiniLMEmbedder(batch_size=0)


def test_length_chunks_bound_padding_and_keep_results(embedder: MiniLMEmbedder) -> None:
    """Texts of very different lengths run in length-sorted chunks within the token budget; the vectors equal
    one unchunked forward pass of all of them (padding is masked out of the pooling)."""
    words = ["castle", "fox", "boat", "lantern", "mountain", "river", "forest", "dragon", "tower", "meadow"]
    texts = [" ".join(words[: 1 + (i * 7) % 10] * (1 + i % 6)) for i in range(24)]
    chunked = MiniLMEmbedder(model=embedder.model, batch_size=8, token_budget=96)
    groups = chunked.chunks(texts)
    assert sorted(i for g in groups for i in g) == list(range(24))
    lengths = [len(x) for x in embedder.model.tokenizer(texts)["input_ids"]]
    for g in groups:
        assert len(g) <= 8
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 96
    assert len(groups) > 3  # the budget did split them
    whole = embedder.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True)
    assert np.allclose(chunked.embed(texts), whole, atol=1e-5)
    with pytest.raises(ValueError, match="token_budget"):
        MiniLMEmbedder(token_budget=0)
