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


def test_retro_pytorch_call_contract() -> None:
    """Code ported from RETRO-pytorch keeps working: `retro(seq, retrieved, return_loss=True)` on a sequence one
    token longer than its chunks returns the loss tensor (targets = seq[:, 1:], pad ignored), return_loss=False
    the logits, a 3-d `retrieved` is one neighbour per chunk, a `mask` narrows the neighbour tokens read."""
    import torch.nn.functional as F

    model = tiny(pad_token_id=0)
    ids, retrieved = batch()
    seq = torch.cat([ids, torch.tensor([[7], [0]])], dim=1)  # n + 1 tokens; the second row ends on a pad
    loss = model(seq, retrieved, return_loss=True)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    logits = model(seq[:, :-1], retrieved, return_loss=False)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, C * M, 50)
    by_hand = F.cross_entropy(logits.reshape(-1, 50), seq[:, 1:].reshape(-1), ignore_index=0)
    torch.testing.assert_close(loss, by_hand)
    one = retrieved[:, :, 0]
    torch.testing.assert_close(model(ids, one, return_loss=False), model(ids, one[:, :, None], return_loss=False))
    hidden = torch.ones_like(retrieved, dtype=torch.bool)
    hidden[:, 1, :, R // 2:] = False  # the second half of chunk 1's neighbours is not read
    plain, masked = model(ids, retrieved, return_loss=False), model(ids, retrieved, mask=hidden, return_loss=False)
    first_reader = 2 * M - 1  # the first position that reads chunk 1's neighbours
    torch.testing.assert_close(masked[:, :first_reader], plain[:, :first_reader])
    assert not torch.allclose(masked[:, first_reader:3 * M - 1], plain[:, first_reader:3 * M - 1])
    with pytest.raises(TypeError, match="neighbours"):
        model(ids, retrieved, neighbours=retrieved)  # a misspelt argument is an error, not ignored
    with pytest.raises(ValueError, match="not both"):
        model(seq, retrieved, labels=seq, return_loss=True)


def test_separate_encoder_width_trains_decodes_and_reloads(tmp_path: Path) -> None:
    """enc_dim != dim (RETRO-pytorch's enc_dim / dec_dim): the encoder runs at its own width; training lowers
    the loss, cached decoding equals the full forward, save/load round-trips."""
    model = tiny(enc_dim=24).train()
    assert model.encoder.norm.weight.shape == (24,) and model.to_encoder_dim.weight.shape == (24, 32)
    ids, retrieved = batch()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss = model(ids, retrieved=retrieved, labels=ids).loss
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < first
    model.eval()
    full = model(ids, retrieved=retrieved).logits
    state = model.new_state()  # one chunk per call, its neighbours handed over with the call that completes it
    steps = [model.forward_cached(ids[:, c * M:(c + 1) * M], state, retrieved={c: retrieved[:, c]}) for c in range(C)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path / "m")
    again = RetroModel.from_pretrained(tmp_path / "m").eval()
    assert again.config.enc_dim == 24
    torch.testing.assert_close(again(ids, retrieved=retrieved).logits, full)


def test_cross_attention_layers_out_of_range_are_refused_and_retro_pytorch_args_map() -> None:
    with pytest.raises(ValueError, match="below dec_depth 3"):
        RetroConfig(dec_depth=3, cross_attn_layers=[1, 3])
    config = RetroConfig.from_retro_pytorch(num_tokens=100, max_seq_len=2048, enc_dim=64, enc_depth=2, dec_dim=48,
                                            dec_depth=6, dec_cross_attn_layers=(3, 6), heads=2, dim_head=16,
                                            chunk_size=8, dec_attn_dropout=0.25, dec_ff_dropout=0.25,
                                            use_deepnet=True, pad_id=0)
    assert (config.vocab_size, config.dim, config.enc_dim, config.cross_attn_layers) == (100, 48, 64, [2, 5])
    assert (config.attn_dropout, config.ff_dropout, config.deepnet, config.pad_token_id) == (0.25, 0.25, True, 0)
    assert RetroConfig.from_retro_pytorch(dec_depth=12).cross_attn_layers == [2, 5, 8, 11]  # RETRO-pytorch's (3, 6, 9, 12)
    with pytest.raises(ValueError, match="enc_cross_attn_layers"):
        RetroConfig.from_retro_pytorch(enc_cross_attn_layers=(1,))
    with pytest.raises(ValueError, match="below dec_depth 6"):
        RetroConfig.from_retro_pytorch(dec_depth=6, dec_cross_attn_layers=(3, 7))
