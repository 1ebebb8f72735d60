"""moekit.cache_rows: the row interface on every cache (K/V, MLA latents, Mixture-of-Depths history, router parts).

Oracle: the same operations done by hand with plain tensor indexing on clones of the buffers.
"""

import pytest
import torch

from moekit.cache_rows import CacheRows, DepthHistory
from moekit.errors import ConfigError
from moekit.models.mla import LatentKVCache
from moekit.modules import KVCache


def kv():
    torch.manual_seed(0)
    cache = KVCache(4, 2, 2, 10, 3)
    for b in cache.buffers():
        b.normal_()
    cache.router_cache = KVCache(4, 1, 1, 10, 2)  # a part (as ReadMeLM attaches its router's cache)
    cache.router_cache.keys[0].normal_()
    cache.update_depth(1, torch.rand(4, 10) > 0.5, 0)
    return cache


def latent():
    torch.manual_seed(1)
    cache = LatentKVCache(4, 2, 10, 5)
    for b in cache.buffers():
        b.normal_()
    return cache


def at(t, row, cols):
    """The index of `cols` of one row: K/V buffers [B, H, M, d] hold columns on axis 2, the others on axis 1."""
    return (row, slice(None), cols) if t.dim() == 4 else (row, cols)


def every_buffer(cache):
    return [b.clone() for b in cache.buffers()] + [b.clone() for p in cache.parts() for b in p.buffers()]


@pytest.mark.parametrize("make", [kv, latent])
def test_move_row_copies_every_buffer_and_part_up_to_end(make):
    cache = make()
    before = every_buffer(cache)
    cache.move_row(3, 1, end=6)
    for old, new in zip(before, every_buffer(cache)):
        want = old.clone()
        want[at(old, 1, slice(0, 6))] = old[at(old, 3, slice(0, 6))]
        assert torch.equal(new, want)


@pytest.mark.parametrize("make", [kv, latent])
def test_compact_moves_the_chosen_columns_in_order_to_end_at_end(make):
    cache = make()
    before = every_buffer(cache)
    cols = torch.tensor([0, 2, 5])
    cache.compact(2, cols, 9)
    for old, new in zip(before, every_buffer(cache)):
        want = old.clone()
        want[at(old, 2, slice(6, 9))] = old[at(old, 2, cols)]
        assert torch.equal(new, want)


def test_a_rows_view_writes_its_rows_at_its_offset_and_reads_back_only_them():
    cache = kv()
    view = cache.rows(torch.tensor([2, 0]), offset=3)
    k, v = torch.randn(2, 2, 4, 3), torch.randn(2, 2, 4, 3)
    k_out, v_out = view.update(1, k, v, 1)  # the family's own signature
    assert torch.equal(cache.keys[1][2, :, 4:8], k[0]) and torch.equal(cache.values[1][0, :, 4:8], v[1])
    assert torch.equal(k_out, cache.keys[1][[2, 0], :, 3:8])  # from the offset to the end of the write
    assert isinstance(view.router_cache, CacheRows)  # a part comes back as the same rows of that part
    chosen = torch.tensor([[True, False], [False, True]])
    assert torch.equal(view.update_depth(0, chosen, 0), chosen)
    assert torch.equal(cache.depth_history().layers[0][[2, 0], 3:5], chosen)
    lat = latent()
    out = lat.rows(slice(1, 3), offset=2).update(0, torch.ones(2, 3, 5), 0)  # one latent: one tensor back
    assert out.shape == (2, 3, 5) and torch.equal(lat.latents[0][1:3, 2:5], torch.ones(2, 3, 5))
    with pytest.raises(ConfigError, match="KV cache overflow"):
        lat.rows(slice(0, 1), offset=8).update(0, torch.ones(1, 3, 5), 0)


def test_truncate_and_reset_reach_the_parts():
    cache = kv()
    cache.truncate(4, row=1)
    assert not cache.keys[0][1, :, 4:].any() and cache.keys[0][0, :, 4:].any()
    assert not cache.router_cache.keys[0][1, :, 4:].any() and not cache.depth_history().layers[1][1, 4:].any()
    cache.lengths = [7, 7]
    cache.truncate(5)
    assert cache.lengths == [5, 5]
    cache.reset()
    assert cache.lengths == [0, 0] and cache.depth_history().layers == {} and cache.router_cache.lengths == [0]
    assert isinstance(cache.depth_history(), DepthHistory)
