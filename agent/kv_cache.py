"""The KV side of `HFPolicy`: a prefix cache, prefill on cached prefixes, batch row layouts.

Prefix cache. An agent's prompts only grow: every episode of a suite starts with the same
system prompt, tool schemas and examples, and each turn's prompt is the previous turn's
context (prompt + sampled ids) + the observation + the next header. The keys and values at a
position depend only on the ids up to it (and on the weights), so a request whose prompt
starts with a cached prefix copies that prefix's KV and prefills only the rest.

- `PrefixCache` is a radix tree: each node holds a run of ids and the KV of that run alone
  (per layer, `[kv_heads, run, head_dim]`), so a prefix that many entries share is stored
  once. A match may end inside a run: the KV of a run's first k ids is its first k columns.
- Entries are never written after insertion: `gather` copies KV out into a new batch and
  `insert` clones what it keeps, so no entry aliases a running batch or another entry.
- Leaves go least recently used first (a lookup touches its whole path, so no node is older
  than its children) until the KV fits `budget_bytes`.
- The tree knows nothing of weights: its owner clears it whenever they may have changed.
- `shared_prefixes` finds the prefixes that prompts admitted together share, so that the
  owner prefills each once before the prompts.

Batch layout. A batch cache is `[rows, kv_heads, columns, head_dim]` per layer with a 2-D
padding mask; each row's ids are right-aligned (left padding) and carry explicit position ids.
`prefill` runs rows whose cached prefixes and suffixes differ in length: the cached KV is
left-padded to the longest prefix, each suffix left-padded to the longest suffix, so a row may
have masked columns *between* its prefix and its suffix (transformers builds its 4-D mask
from the 2-D one elementwise, holes included, for SDPA and eager alike: see
tests/test_prefix_cache.py); `prefill` then right-aligns such rows again, so the running batch
never has holes; `append_rows` and `take_rows` merge and shrink it. Its layers are
`SpareLayer`s, which append each decode step in place into spare columns.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer

MIN_SHARED_IDS = 32
"""A prefix that prompts admitted together share is prefilled on its own (one extra forward
pass) only when it adds at least this many ids to the cache."""


@dataclass(eq=False)
class _Node:
    ids: list[int]
    """The run of ids this node adds to its parent's prefix."""
    keys: list[torch.Tensor]
    """Per layer, the keys of `ids` alone: `[kv_heads, len(ids), head_dim]`."""
    values: list[torch.Tensor]
    """Per layer, the values of `ids` alone, shaped like `keys`."""
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    """Children by the first id of their run."""
    used: int = 0
    """Tick of the last lookup or insert that passed through the node."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))


@dataclass(frozen=True, eq=False)
class Hit:
    """The longest cached prefix of some ids."""

    length: int
    """How many ids of the prefix have cached KV."""
    path: tuple[tuple[_Node, int], ...]
    """The nodes that hold it, root side first, each with how many ids of its run it gives."""


class PrefixCache:
    """KV of token-id prefixes under a byte budget (see the module docstring)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        """Bytes of KV held now."""
        self._root = _Node([], [], [], None)
        self._tick = 0

    def lookup(self, ids: list[int], limit: int) -> Hit:
        """The longest cached prefix of `ids[:limit]`; touches the nodes it passes."""
        self._tick += 1
        node, length, path = self._root, 0, []
        while length < limit:
            child = node.children.get(ids[length])
            if child is None:
                break
            end = min(limit, length + len(child.ids))
            n = common_length(child.ids, ids[length:end])
            child.used = self._tick
            path.append((child, n))
            length += n
            if n < len(child.ids):
                break
            node = child
        return Hit(length, tuple(path))

    def insert(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep the KV of `ids` (per layer `[kv_heads, len(ids), head_dim]`, views welcome):
        only the part not cached yet is copied in. May evict anything, this entry included."""
        hit = self.lookup(ids, len(ids))
        at = hit.length
        if at == len(ids):
            return
        parent = self._root
        if hit.path:
            node, n = hit.path[-1]
            parent = node if n == len(node.ids) else self._split(node, n)
        leaf = _Node(
            ids[at:],
            [k[:, at:].clone() for k in keys],
            [v[:, at:].clone() for v in values],
            parent,
            used=self._tick,
        )
        parent.children[leaf.ids[0]] = leaf
        self.nbytes += leaf.nbytes
        self._evict()

    def insert_row(self, ids: list[int], cache: DynamicCache, row: int) -> None:
        """Keep the KV of `ids`, found in the last `len(ids)` columns of `row` of `cache`."""
        kv = [dynamic_layer(layer)[1] for layer in cache.layers]
        n = len(ids)
        self.insert(ids, [k[row, :, -n:] for k, _ in kv], [v[row, :, -n:] for _, v in kv])

    def gather(
        self, hits: Sequence[Hit], width: int, spare: int, config: PretrainedConfig
    ) -> DynamicCache:
        """A batch cache holding each hit's KV left-padded with zero columns to `width`, with
        room for `spare` more columns (`SpareLayer`s)."""
        first = next(h.path[0][0] for h in hits if h.path)
        shape = (len(hits), first.keys[0].shape[0], width + spare, first.keys[0].shape[2])
        keys = [k.new_empty(shape) for k in first.keys]
        values = [v.new_empty(shape) for v in first.values]
        for i, hit in enumerate(hits):
            at = width - hit.length
            if at:  # masked, but never garbage: 0 x NaN would still be NaN
                for out in keys + values:
                    out[i, :, :at] = 0
            for node, n in hit.path:
                for out, part in zip(keys + values, node.keys + node.values, strict=True):
                    out[i, :, at : at + n] = part[:, :n]
                at += n
        cache = DynamicCache(config=config)
        cache.layers = [SpareLayer.of(k, v, width) for k, v in zip(keys, values, strict=True)]
        return cache

    def clear(self) -> None:
        self._root.children.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        """Nodes held (the root aside)."""
        return sum(1 for _ in self._nodes())

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut `node`'s run after `n` ids; returns the new node that holds the first part."""
        parent = node.parent
        assert parent is not None
        # Clones rather than views: a view would keep the whole old run alive after eviction.
        head = _Node(
            node.ids[:n],
            [k[:, :n].clone() for k in node.keys],
            [v[:, :n].clone() for v in node.values],
            parent,
            used=node.used,
        )
        node.ids = node.ids[n:]
        node.keys = [k[:, n:].clone() for k in node.keys]
        node.values = [v[:, n:].clone() for v in node.values]
        node.parent = head
        head.children[node.ids[0]] = node
        parent.children[head.ids[0]] = head
        return head

    def _evict(self) -> None:
        while self.nbytes > self.budget_bytes:
            leaves = [node for node in self._nodes() if not node.children]
            if not leaves:
                return
            victim = min(leaves, key=lambda node: node.used)
            assert victim.parent is not None
            del victim.parent.children[victim.ids[0]]
            self.nbytes -= victim.nbytes

    def _nodes(self) -> list[_Node]:
        nodes, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes


def common_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of `a` and `b`."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    # Bisection on slice equality: C-speed comparisons, O(n) ids compared in all.
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def shared_prefixes(prompts: Sequence[list[int]], cache: PrefixCache) -> list[list[int]]:
    """Prefixes that two or more of `prompts` share and that are worth prefilling once before
    them: each leaves every prompt that has it at least one id of its own, adds at least
    `MIN_SHARED_IDS` ids to what is cached, and is no prefix of another one returned."""
    found: dict[tuple[int, ...], list[int]] = {}
    # In sorted order each prompt's longest common prefix with any other is with a neighbour.
    for a, b in itertools.pairwise(sorted(prompts)):
        n = min(common_length(a, b), len(a) - 1, len(b) - 1)
        if n - cache.lookup(a, n).length >= MIN_SHARED_IDS:
            found[tuple(a[:n])] = a[:n]
    prefixes = list(found.values())
    return [p for p in prefixes if not any(len(q) > len(p) and q[: len(p)] == p for q in prefixes)]


def prefill(
    model: PreTrainedModel,
    prompts: list[list[int]],
    hits: list[Hit],
    tree: PrefixCache | None,
    *,
    pad_id: int,
    cache_kwarg: str,
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """One forward pass over each prompt's ids past its cached prefix (`hits`, from `tree`).

    Returns the batch cache and its `[N, T]` mask (each row right-aligned, no holes) and each
    row's logits after its last id, `[N, vocab]`.
    """
    device = next(model.parameters()).device
    cached = [h.length for h in hits]
    suffix = [len(p) - c for p, c in zip(prompts, cached, strict=True)]
    prefix_w, suffix_w = max(cached), max(suffix)
    rows = list(zip(prompts, cached, suffix, strict=True))
    ids = [[pad_id] * (suffix_w - s) + p[c:] for p, c, s in rows]
    # Padding ids sit at position 0; they are masked as keys, and nothing reads their outputs.
    pos = [[0] * (suffix_w - s) + list(range(c, c + s)) for _, c, s in rows]
    mask = [[0] * (prefix_w - c) + [1] * c + [0] * (suffix_w - s) + [1] * s for _, c, s in rows]
    mask_N_W = torch.tensor(mask, dtype=torch.long, device=device)
    if prefix_w:
        assert tree is not None
        # Room for the suffix (which the forward pass appends in place) and then for decoding.
        extra = suffix_w + room(prefix_w + suffix_w)
        past = tree.gather(hits, prefix_w, extra, model.config)
    else:
        past = spare_cache(model.config)
    out = model(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        attention_mask=mask_N_W,
        position_ids=torch.tensor(pos, dtype=torch.long, device=device),
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg: past},
    )
    # The output field follows the argument's name (`cache` from transformers 5.24).
    cache: DynamicCache = getattr(out, cache_kwarg)
    if any(c and s < suffix_w for _, c, s in rows):
        mask_N_W = _compact(cache, cached, suffix)
    return cache, mask_N_W, out.logits[:, -1, :]


def _compact(cache: DynamicCache, cached: list[int], suffix: list[int]) -> torch.Tensor:
    """Right-align each row of a cache `prefill` filled: its cached prefix moves up against its
    suffix, over the padding between them. Returns the new `[N, T]` mask."""
    prefix_w, suffix_w = max(cached), max(suffix)
    lengths = [c + s for c, s in zip(cached, suffix, strict=True)]
    width = max(lengths)
    for index, (_, (keys, values)) in enumerate(map(dynamic_layer, cache.layers)):
        shape = (*keys.shape[:2], width + room(width), keys.shape[3])
        buffers = (keys.new_empty(shape), values.new_empty(shape))
        for out, old in zip(buffers, (keys, values), strict=True):
            for i, (c, s) in enumerate(zip(cached, suffix, strict=True)):
                out[i, :, : width - c - s] = 0
                out[i, :, width - c - s : width - s] = old[i, :, prefix_w - c : prefix_w]
                out[i, :, width - s : width] = old[i, :, prefix_w + suffix_w - s :]
        cache.layers[index] = SpareLayer.of(*buffers, width)
    columns = torch.arange(width, device=keys.device)
    lengths_N = torch.tensor(lengths, device=keys.device)
    return (columns >= width - lengths_N[:, None]).long()


def room(n: int) -> int:
    """Spare columns to allocate past `n`: growing with the cache, so that copies get rarer as
    rows grow."""
    return max(64, n // 4)


def plain_layers(config: PretrainedConfig) -> bool:
    """Whether every cache layer of the model is a plain `DynamicLayer`. Sliding-window layers
    drop old columns as they append, so they hold no whole prefix to cache."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def spare_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty cache whose plain layers are `SpareLayer`s."""
    cache = DynamicCache(config=config)
    cache.layers = [SpareLayer() if type(lay) is DynamicLayer else lay for lay in cache.layers]
    return cache


class SpareLayer(DynamicLayer):
    """A `DynamicLayer` that appends into spare columns in place. `DynamicLayer` concatenates
    the whole cache at each decode step: a copy of every row's KV per sampled id, which for 16
    rows of 800 ids of SmolLM2-135M (590 MB) took ~0.5 s here, longer than the forward pass.
    Whoever replaces `keys` and `values` (merging, dropping rows) hands the layer tensors with
    no room; the next append then moves them into a buffer with `room` to grow."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    """Key and value storage whose first columns are `keys` and `values`."""

    @classmethod
    def of(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> SpareLayer:
        """A layer holding the first `length` columns of `keys` and `values`; the rest is room."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._buffers = (keys, values)
        layer.keys, layer.values = keys[:, :, :length], values[:, :, :length]
        return layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values, buffers = self.keys, self.values, self._buffers
        n = keys.shape[2] if keys is not None and keys.dim() == 4 else 0
        add = key_states.shape[2]
        if not (n and buffers and _heads(keys, buffers[0]) and buffers[0].shape[2] >= n + add):
            shape = (*key_states.shape[:2], n + add + room(n + add), key_states.shape[3])
            buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
            if n and keys is not None and values is not None:
                buffers[0][:, :, :n] = keys
                buffers[1][:, :, :n] = values
            self._buffers = buffers
        buffers[0][:, :, n : n + add] = key_states
        buffers[1][:, :, n : n + add] = value_states
        self.keys, self.values = buffers[0][:, :, : n + add], buffers[1][:, :, : n + add]
        return self.keys, self.values


def _heads(view: torch.Tensor | None, buffer: torch.Tensor) -> bool:
    """Whether `view` is the first columns of `buffer` (not a tensor put in its place)."""
    return (
        view is not None
        and view.data_ptr() == buffer.data_ptr()
        and view.stride() == buffer.stride()
        and view.shape[:2] == buffer.shape[:2]
    )


def dynamic_layer(layer: object) -> tuple[DynamicLayer, tuple[torch.Tensor, torch.Tensor]]:
    """A cache layer with its key and value tensors, shaped [batch, heads, time, head_dim]."""
    if not isinstance(layer, DynamicLayer):
        raise TypeError(f"HFPolicy needs a DynamicCache; got a {type(layer).__name__} layer")
    if layer.keys is None or layer.values is None:
        raise TypeError("HFPolicy needs every cache layer filled")
    return layer, (layer.keys, layer.values)


def append_rows(
    cache: DynamicCache, mask_B_T: torch.Tensor, more: DynamicCache, more_mask_N_P: torch.Tensor
) -> torch.Tensor:
    """Append `more`'s rows to `cache` in place, left-padding the narrower side with masked
    zero columns; returns the merged mask."""
    old, new = mask_B_T.shape[1], more_mask_N_P.shape[1]
    width = max(old, new)
    for mine, theirs in zip(cache.layers, more.layers, strict=True):
        layer, (keys, values) = dynamic_layer(mine)
        _, (more_keys, more_values) = dynamic_layer(theirs)
        layer.keys = torch.cat([_pad_left(keys, width - old), _pad_left(more_keys, width - new)])
        layer.values = torch.cat(
            [_pad_left(values, width - old), _pad_left(more_values, width - new)]
        )
    return torch.cat([F.pad(mask_B_T, (width - old, 0)), F.pad(more_mask_N_P, (width - new, 0))])


def take_rows(cache: DynamicCache, mask_B_T: torch.Tensor, index_K: torch.Tensor) -> torch.Tensor:
    """Keep only rows `index_K` of `cache` in place; returns their mask. Columns that only
    the dropped rows used are padding for every row left: they are trimmed."""
    mask_K_T = mask_B_T[index_K]
    first = int(mask_K_T.any(dim=0).long().argmax())
    for layer, (keys, values) in map(dynamic_layer, cache.layers):
        layer.keys = keys[index_K, :, first:]
        layer.values = values[index_K, :, first:]
    return mask_K_T[:, first:]


def _pad_left(x_B_H_T_D: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(x_B_H_T_D, (0, 0, n, 0)) if n else x_B_H_T_D
