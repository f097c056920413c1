"""The RETRO model on a tiny config: shapes, chunked cross-attention causality, training, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragkit.archs.retro.model import RetroConfig, RetroModel

M, K, R, C = 4, 2, 8, 3  # chunk size, neighbours, neighbour length, chunks


def tiny(**kw) -> RetroModel:
    torch.manual_seed(0)
    config = RetroConfig(vocab_size=50, dim=32, dec_depth=3, enc_depth=1, heads=2, dim_head=16, chunk_size=M,
                         num_neighbors=K, neighbor_len=R, cross_attn_layers=[1, 2], **kw)
    return RetroModel(config).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 50, (2, C * M), generator=g), torch.randint(1, 50, (2, C, K, R), generator=g)


def test_shapes_and_loss() -> None:
    model = tiny()
    ids, retrieved = batch()
    out = model(ids, retrieved=retrieved, labels=ids)
    assert out.logits.shape == (2, C * M, 50)
    assert out.loss is not None and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        model(ids[:, :-1])
    with pytest.raises(ValueError, match="expected"):
        model(ids, retrieved=retrieved[:, :2])


def test_a_chunks_neighbours_reach_only_positions_that_saw_the_whole_chunk() -> None:
    model = tiny()
    ids, retrieved = batch()
    with torch.no_grad():
        base = model(ids, retrieved=retrieved).logits
        for j in range(C):
            changed = retrieved.clone()
            changed[:, j] = (changed[:, j] + 7) % 49 + 1
            out = model(ids, retrieved=changed).logits
            first = (j + 1) * M - 1  # the last position of chunk j
            assert torch.allclose(out[:, :first], base[:, :first], atol=1e-5), f"chunk {j} leaked backwards"
            assert not torch.allclose(out[:, first:], base[:, first:], atol=1e-5), f"chunk {j} had no effect"


def test_tokens_never_see_the_future() -> None:
    model = tiny()
    ids, retrieved = batch()
    with torch.no_grad():
        base = model(ids, retrieved=retrieved).logits
        for p in (0, M, 2 * M + 1):
            changed = ids.clone()
            changed[:, p] = (changed[:, p] + 3) % 49 + 1
            out = model(changed, retrieved=retrieved).logits
            assert torch.allclose(out[:, :p], base[:, :p], atol=1e-5)


def test_runs_without_neighbours_and_with_all_padding_neighbours() -> None:
    model = tiny()
    ids, retrieved = batch()
    with torch.no_grad():
        alone = model(ids).logits
        with_all_pad = model(ids, retrieved=torch.zeros_like(retrieved)).logits
    assert torch.isfinite(with_all_pad).all()
    assert alone.shape == with_all_pad.shape


@pytest.mark.parametrize("deepnet", [False, True])
def test_a_few_steps_lower_the_loss(deepnet: bool) -> None:
    model = tiny(deepnet=deepnet).train()
    ids, retrieved = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, retrieved=retrieved, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


def test_save_and_load_with_auto_classes(tmp_path: Path) -> None:
    from transformers import AutoModel

    model = tiny()
    model.save_pretrained(tmp_path / "retro")
    loaded = AutoModel.from_pretrained(tmp_path / "retro").eval()
    ids, retrieved = batch()
    with torch.no_grad():
        assert torch.allclose(loaded(ids, retrieved=retrieved).logits, model(ids, retrieved=retrieved).logits, atol=1e-6)
    assert loaded.config.cross_attn_layers == [1, 2] and loaded.config.chunk_size == M


@pytest.mark.parametrize("split", [1, 5, M, 2 * M + 1])
def test_cached_decoding_gives_the_full_forward_logits(split: int) -> None:
    """Prefill `split` tokens, then one at a time; every completed chunk's neighbours handed over once."""
    model = tiny()
    ids, retrieved = batch()
    with torch.no_grad():
        full = model(ids, retrieved=retrieved).logits
        plain = model(ids).logits
    state = model.new_state()

    def completed(lo: int, hi: int) -> dict[int, torch.Tensor]:  # chunks whose last position is in [lo, hi)
        return {c: retrieved[:, c] for c in range(C) if lo <= (c + 1) * M - 1 < hi}

    parts = [model.forward_cached(ids[:, :split], state, completed(0, split))]
    for t in range(split, C * M):
        parts.append(model.forward_cached(ids[:, t:t + 1], state, completed(t, t + 1)))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    no_neighbours = model.new_state()
    assert torch.allclose(model.forward_cached(ids, no_neighbours), plain, atol=1e-5)
    with pytest.raises(ValueError, match="not complete"):
        model.forward_cached(ids[:, :1], model.new_state(), {0: retrieved[:, 0]})


def test_negative_ids_are_padding_in_neighbours() -> None:
    model = tiny(pad_token_id=None)
    ids, retrieved = batch()
    padded = retrieved.clone()
    padded[:, :, 1] = -1  # the second neighbour of every chunk missing
    with torch.no_grad():
        a = model(ids, retrieved=padded).logits
        b = model(ids, retrieved=padded[:, :, :1]).logits  # the same as giving one neighbour
    assert torch.allclose(a, b, atol=1e-5)


def test_chunked_cross_attention_learns_to_copy_from_neighbours() -> None:
    """Random token sequences cannot be predicted, except by reading each chunk's neighbour, which holds the
    chunk and its continuation: the loss must fall far below ln(V), which a decoder alone cannot do."""
    torch.manual_seed(0)
    m, c, v = 4, 4, 32
    model = RetroModel(RetroConfig(vocab_size=v, dim=64, dec_depth=2, enc_depth=1, heads=4, dim_head=16,
                                   chunk_size=m, num_neighbors=1, cross_attn_layers=[1], pad_token_id=None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        ids = torch.randint(0, v, (16, c * m))
        chunks = ids.view(16, c, m)
        following = torch.cat([chunks[:, 1:], torch.full((16, 1, m), -1)], 1)
        loss = model(ids, retrieved=torch.cat([chunks, following], -1)[:, :, None], labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # only the first chunk's first m - 1 predictions are unreadable: the floor is about 3/15 of ln(32) = 0.69
    assert loss.item() < 1.5 < torch.log(torch.tensor(float(v))).item()
