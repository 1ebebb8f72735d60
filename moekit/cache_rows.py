"""Caches that own their rows: the one interface a serving scheduler moves sequences through.

`RowCache` is the base of every generation cache: the standard K/V cache
(moekit.modules.KVCache), MLA's latent cache (moekit.models.mla.LatentKVCache),
a Read-ME router's cache (a KVCache held as `router_cache`) and the
Mixture-of-Depths history (`DepthHistory`, here). Each family keeps its own
`update` signature (K/V pairs, one latent, one choice mask); what they share
is the layout: per layer, a tuple of buffers whose first axis is the batch
row and whose `time_dim` axis is the cache column. On that layout the row
operations are written once:

- `rows(index, offset)`: a view of some rows (a slice or an index tensor)
  whose columns start at `offset`. A forward of just those rows writes
  through it (`update(layer, *tensors, start)`, `update_depth`) and reads
  back only their keys, from `offset` to the end of the write;
- `move_row(src, dst, end)`: row src copied onto row dst, columns [:end];
- `compact(row, cols, end)`: the row's columns `cols`, in order, moved to end at column `end`;
- `truncate(n, row=None)`: forget columns >= n (one row's are zeroed);
- `reset()`: forget everything.

A cache's parts take part in every row operation: its depth history (made by
the first `update_depth`) and any RowCache it holds as an attribute (a
router cache). So a scheduler moves a row of any family, Mixture-of-Depths
choices and routing caches included, without knowing which family it holds.

Not here: the K/V and latent caches themselves and attention (moekit.modules,
moekit.models.mla), the scheduler (moekit.infer.scheduler).

Shape suffixes: B rows, T new columns, M columns (max_len).
"""

from __future__ import annotations

import torch

from .errors import ConfigError


def check_cache_write(start: int, t: int, batch: int, max_len: int, batch_size: int) -> None:
    """A ConfigError unless writing t positions of `batch` rows at `start` fits a cache of max_len x batch_size."""
    end = start + t
    if start < 0 or end > max_len:
        raise ConfigError(
            f"KV cache overflow: writing {t} position(s) at start={start} needs {end}, "
            f"but the cache holds max_len={max_len}"
        )
    if batch > batch_size:
        raise ConfigError(f"KV cache batch overflow: got batch {batch}, the cache holds batch_size={batch_size}")


class RowCache:
    """The row interface (module docstring). Subclasses set `time_dim` and give `layer_buffers` and `num_layers`."""

    time_dim = 2  # the column axis of every layer buffer (the batch row is axis 0)
    # True when the model's attention counts a sliding window in cache columns: a row's columns must then stay
    # contiguous (a scheduler that leaves a gap in a row compacts it before the row's next write)
    contiguous_rows = False
    batch_size: int
    max_len: int

    # ------------------------------------------------------------ what a subclass gives

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    def layer_buffers(self, layer_idx: int) -> tuple[torch.Tensor, ...]:
        """The buffers of one layer, in the order `update` takes their new values."""
        raise NotImplementedError

    # ------------------------------------------------------------ buffers and parts

    def buffers(self) -> list[torch.Tensor]:
        return [b for i in range(self.num_layers) for b in self.layer_buffers(i)]

    def parts(self) -> list[RowCache]:
        """Caches that move with this one: the depth history and any RowCache attribute (a router cache)."""
        return [v for v in vars(self).values() if isinstance(v, RowCache)]

    def depth_history(self) -> DepthHistory:
        """The Mixture-of-Depths choices beside this cache (made on first use)."""
        history = getattr(self, "_depth", None)
        if history is None:
            history = self._depth = DepthHistory(self.batch_size, self.max_len)
        return history

    def _at(self, rows, a: int, b: int | None) -> tuple:
        return (rows, *([slice(None)] * (self.time_dim - 1)), slice(a, b))

    # ------------------------------------------------------------ writes

    def write(self, layer_idx: int, new: tuple[torch.Tensor, ...], start: int, rows=None, offset: int = 0) -> list[torch.Tensor]:
        """Write `new` (one tensor per layer buffer, rows first) into `rows` at columns offset+start...

        Returns each buffer's view of those rows from column `offset` to the end of the write.
        rows: a slice or an index tensor (None: the first rows, as many as `new` has).
        """
        batch, t = new[0].shape[0], new[0].shape[self.time_dim]
        a, b = offset + start, offset + start + t
        check_cache_write(a, t, batch, self.max_len, self.batch_size)
        rows = slice(0, batch) if rows is None else rows
        out = []
        for buf, x in zip(self.layer_buffers(layer_idx), new):
            buf[self._at(rows, a, b)] = x
            out.append(buf[self._at(rows, offset, b)])
        return out

    def update_depth(self, layer_idx: int, chosen_BT: torch.Tensor, start: int) -> torch.Tensor:
        """Record which new positions a Mixture-of-Depths layer computed for; [B, start+T] its choices so far."""
        return self.depth_history().update(layer_idx, chosen_BT, start)

    def rows(self, index, offset: int = 0) -> CacheRows:
        """A view of rows `index` (a slice or an index tensor) whose columns start at `offset`."""
        return CacheRows(self, index, offset)

    # ------------------------------------------------------------ row operations

    def move_row(self, src: int, dst: int, end: int | None = None) -> None:
        """Row `src` copied onto row `dst` (columns [:end]), every layer, every buffer, every part."""
        for buf in self.buffers():
            buf[self._at(dst, 0, end)] = buf[self._at(src, 0, end)]
        for part in self.parts():
            part.move_row(src, dst, end)

    def compact(self, row: int, cols: torch.Tensor, end: int) -> None:
        """Row `row`'s columns `cols` (ascending), in order, moved to columns [end - len(cols), end)."""
        for buf in self.buffers():
            kept = buf[row].index_select(self.time_dim - 1, cols.to(buf.device))
            buf[self._at(row, end - len(cols), end)] = kept
        for part in self.parts():
            part.compact(row, cols, end)

    def truncate(self, n: int, row: int | None = None) -> None:
        """Forget columns >= n: of one row (zeroed), or of every row (the write lengths)."""
        if row is None:
            self.lengths = [min(length, n) for length in self.lengths]
        else:
            for buf in self.buffers():
                buf[self._at(row, n, None)] = 0
        for part in self.parts():
            part.truncate(n, row)

    def reset(self) -> None:
        """Forget every position; buffers are reused, not zeroed (nothing reads past `lengths`)."""
        self.lengths = [0] * self.num_layers
        for part in self.parts():
            part.reset()


class DepthHistory(RowCache):
    """Mixture-of-Depths: per MoD layer, which cached positions it computed for, [B, M] booleans (made on first write)."""

    time_dim = 1

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.layers: dict[int, torch.Tensor] = {}
        self.lengths: list[int] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def buffers(self) -> list[torch.Tensor]:
        return list(self.layers.values())

    def layer_buffers(self, layer_idx: int) -> tuple[torch.Tensor, ...]:
        return (self.layers[layer_idx],)

    def write(self, layer_idx: int, new: tuple[torch.Tensor, ...], start: int, rows=None, offset: int = 0) -> list[torch.Tensor]:
        if layer_idx not in self.layers:
            self.layers[layer_idx] = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool, device=new[0].device)
        return super().write(layer_idx, new, start, rows, offset)

    def update(self, layer_idx: int, chosen_BT: torch.Tensor, start: int) -> torch.Tensor:
        return self.write(layer_idx, (chosen_BT,), start)[0]

    def reset(self) -> None:
        self.layers.clear()


class CacheRows:
    """Some rows of a RowCache, columns from `offset`: what a forward of just those rows is given as its cache."""

    def __init__(self, cache: RowCache, rows, offset: int = 0) -> None:
        self.cache, self.rows_index, self.offset = cache, rows, offset

    @property
    def max_len(self) -> int:
        return self.cache.max_len - self.offset

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def update(self, layer_idx: int, *args):
        """The family's own update (`update(layer, k, v, start)`, `update(layer, latent, start)`) on these rows."""
        *new, start = args
        out = self.cache.write(layer_idx, tuple(new), start, self.rows_index, self.offset)
        return out[0] if len(out) == 1 else tuple(out)

    def update_depth(self, layer_idx: int, chosen_BT: torch.Tensor, start: int) -> torch.Tensor:
        return self.cache.depth_history().write(layer_idx, (chosen_BT,), start, self.rows_index, self.offset)[0]

    def __getattr__(self, name: str):
        """A part of the cache (a router cache) comes back as the same rows of that part."""
        if name.startswith("_") or name in ("cache", "rows_index", "offset"):
            raise AttributeError(name)
        part = getattr(self.cache, name)
        if isinstance(part, RowCache):
            return CacheRows(part, self.rows_index, self.offset)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (only the cache's parts pass through)")


__all__ = ["RowCache", "CacheRows", "DepthHistory", "check_cache_write"]
