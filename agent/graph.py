"""Trajectory graphs: the episodes of one task group merged into a DAG of shared states.

A state is the history of (action, observation) pairs since the task began; two turns of a
group start from the same state when everything before them was the same. `state_keys` gives
every turn the key of the state it starts from (turn 0: the group's root), built by chaining a
hash of each turn's normalised action and its observation onto the previous key, so equal
histories get equal keys without comparing whole histories.

Normalisation: an action is its tool calls as (name, arguments as canonical JSON) — or, for a
call that did not parse, its raw argument text — plus its answer with whitespace collapsed
and case folded; a turn with neither is keyed by its completion text with whitespace
collapsed. The observation is the tool results' texts and error kinds (what the agent read).

Keys are stable across processes (`turnrl.agent.state_key` computes them; the runner stores
each turn's as it records it, `Turn.state_key`). Cost, measured on the 2-core dev VM: ~3-5 µs
a turn, most of it reading the records' scattered objects rather than hashing; so the keys of
an episode are memoised by the episode's identity (records are frozen: an episode must not be
mutated in place), and the graph, GiGPO and SALT of one batch compute them once (~0.1 µs a
turn after that). The memo holds the episode weakly and forgets it when it dies;
`clear_key_cache` forgets everything (for benchmarks measuring the cold cost).

`TrajectoryGraph` merges one group's episodes into nodes keyed that way — a prefix tree, the
special DAG in which every state has one parent, because a key is the whole history — with
visit counts, mean returns and success rates, a JSON export (schema below), and `branch_spec`,
which turns any node into an `EpisodeSpec` whose stored prefix the runner restores (token ids
exactly, tool state by replaying the recorded calls) before it samples on.

Similarity merge (off by default): `TrajectoryGraph.build(..., similarity=s)` also merges a
turn into an existing sibling — same parent node, same normalised action — whose observation
is near-identical: Jaccard similarity >= `s` between the sets of word bigrams of the two
observation texts (whitespace-split, case-folded; a text of fewer than two words is its own
single shingle). For tools whose output varies in unimportant ways (timestamps, addresses,
timings). Episodes are taken in input order; a turn with no exact match joins the most similar
qualifying sibling (the earliest on a tie), otherwise opens a new node, whose text stays the
representative its later siblings are compared with. Keys below a merged node chain from the
node's key, so a history's key no longer equals `after_keys` of every episode through it: use
`TrajectoryGraph.paths`/`state_keys` instead. With no merge made the keys are the exact ones.
"""

from __future__ import annotations

import json
import weakref
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from hashlib import blake2b
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from turnrl.agent.records import Episode, Turn
from turnrl.agent.state_key import ROOT, chain_key, normalise, turn_text

if TYPE_CHECKING:
    from turnrl.agent.runner import EpisodeSpec

SCHEMA = "turnrl.trajectory_graph/1"
"""`schema` field of `TrajectoryGraph.to_json`; bumped on any incompatible change."""


def action_key(turn: Turn) -> str:
    """The normalised action of a turn (see the module docstring)."""
    parts = []
    for call in turn.tool_calls:
        if call.parse_error is None and call.name is not None:
            args = json.dumps(call.arguments or {}, sort_keys=True, ensure_ascii=False)
            parts.append(f"call:{call.name}:{args}")
        else:
            parts.append(f"bad:{normalise(call.raw)}")
    if turn.answer is not None:
        parts.append(f"answer:{normalise(turn.answer)}")
    if not parts:
        parts.append(f"text:{normalise(turn.text)}")
    return "\x1f".join(parts)


def observation_key(turn: Turn) -> str:
    """What the environment showed after the turn."""
    return "\x1f".join(f"{r.error or ''}:{r.text}" for r in turn.tool_results)


class _Memo(weakref.ref[Episode]):
    """A cache entry: a weak reference to the episode that carries the episode's keys."""

    __slots__ = ("ident", "keys")
    ident: int
    keys: tuple[str, ...]


_memo: dict[int, _Memo] = {}


def _forget(ref: weakref.ref[Episode]) -> None:
    # Runs as the episode dies, before its id can be reused.
    if isinstance(ref, _Memo) and _memo.get(ref.ident) is ref:
        del _memo[ref.ident]


def _after(episode: Episode) -> tuple[str, ...]:
    ident = id(episode)
    memo = _memo.get(ident)
    if memo is not None and memo() is episode:
        return memo.keys
    stored = [t.state_key for t in episode.turns]
    if all(k is not None for k in stored):  # recorded by the runner: nothing to hash
        return tuple(k for k in stored if k is not None)
    keys = []
    parent = ROOT
    for turn in episode.turns:  # `chain_key`, inlined: this loop is the cold cost of a batch
        data = f"{parent}\x1e{turn_text(turn)}".encode("utf-8", "surrogatepass")
        parent = blake2b(data, digest_size=12).hexdigest()
        keys.append(parent)
    memo = _Memo(episode, _forget)
    memo.ident, memo.keys = ident, tuple(keys)
    _memo[ident] = memo
    return memo.keys


def clear_key_cache() -> None:
    """Forget every memoised key (see the module docstring)."""
    _memo.clear()


def state_keys(episode: Episode) -> list[str]:
    """Key of the state each turn starts from; `[ROOT, k1, k2, ...]` (one per turn)."""
    after = _after(episode)
    return [ROOT, *after[:-1]] if after else []


def after_keys(episode: Episode) -> list[str]:
    """Key of the state after each turn (its action and observation)."""
    return list(_after(episode))


def group_state_keys(episodes: Sequence[Episode]) -> list[list[str]]:
    """`state_keys` of each episode (keys are only comparable within one task group)."""
    return [state_keys(e) for e in episodes]


def _shingles(text: str) -> frozenset[str]:
    words = text.casefold().split()
    if len(words) < 2:
        return frozenset(words[:1] or [""])
    return frozenset(f"{a} {b}" for a, b in pairwise(words))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b|; 1.0 for two empty sets."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


@dataclass(frozen=True)
class Node:
    """One state of a group's trajectory graph: a history of (action, observation) pairs."""

    key: str
    """`ROOT`, or the key of the state after the turn that leads here (`after_keys`)."""
    parent: str | None
    """Key of the state this one was reached from; None for the root."""
    depth: int
    """Turns taken to reach it (0 for the root)."""
    action: str
    """`action_key` of the turn that leads here ("" for the root)."""
    observation: str
    """`observation_key` of that turn (with a similarity merge: the first one seen)."""
    visits: int
    """Episodes that reached this state."""
    ends: int
    """Of those, episodes whose last turn led here."""
    mean_return: float | None
    """Mean return of the episodes that reached it; None when the graph has no returns."""
    success_rate: float | None
    """Fraction of those episodes that succeeded; None when the graph has no success flags."""
    children: dict[str, tuple[str, ...]]
    """Child keys by the `action_key` that leads to them, in order of first visit (one action
    can lead to several states when its observations differ)."""
    episodes: tuple[int, ...]
    """Indices (into `TrajectoryGraph.episode_ids`) of the episodes that reached it, in input
    order; the first is the node's representative (its texts), and `branch_spec` restores the
    turns of the first of them that can be continued from here."""


@dataclass(frozen=True, eq=False)
class TrajectoryGraph:
    """The episodes of one task group merged into a tree of shared states (see the module
    docstring). Build with `build`; the per-node view is `nodes` (or `node(key)`)."""

    group_id: str
    """The episodes' `group_id` (one task group per graph)."""
    task_id: str
    """The first episode's `task_id`."""
    episode_ids: tuple[str, ...]
    """The episodes, in the order they were given."""
    paths: tuple[tuple[str, ...], ...]
    """For each episode, the key of the node after each of its turns (the root not included)."""
    returns: tuple[float, ...] | None
    """Each episode's return, when given."""
    success: tuple[bool, ...] | None
    """Whether each episode succeeded, when given."""
    similarity: float | None
    """The Jaccard threshold of the similarity merge; None for exact merging only."""
    episodes: tuple[Episode, ...] = field(default=(), repr=False)
    """The episodes themselves (empty for a graph loaded from JSON): what `branch_spec` and
    the node texts read."""
    _edges: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    """key -> (action, observation) texts; filled lazily from the episodes, or from JSON."""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    """What is derived from the paths on first use (building a graph is O(episodes))."""

    # --- construction -------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        episodes: Sequence[Episode],
        returns: Sequence[float] | None = None,
        success: Sequence[bool] | None = None,
        similarity: float | None = None,
    ) -> TrajectoryGraph:
        """Merge `episodes` (one task group, as many as there are: G rollouts) into a graph.

        `returns[i]` and `success[i]` belong to `episodes[i]` and give the nodes' mean return
        and success rate. `similarity` turns on the similarity merge (module docstring); it
        must be in (0, 1]."""
        if not episodes:
            raise ValueError("a trajectory graph needs at least one episode")
        groups = {e.group_id for e in episodes}
        if len(groups) > 1:
            raise ValueError(f"episodes of one task group expected, got groups {sorted(groups)}")
        if similarity is not None and not 0.0 < similarity <= 1.0:
            raise ValueError(f"similarity threshold must be in (0, 1], got {similarity}")
        if similarity is None:
            paths = [_after(e) for e in episodes]
        else:
            paths = _merged_paths(episodes, similarity)
        return cls._from_paths(
            group_id=episodes[0].group_id,
            task_id=episodes[0].task_id,
            episode_ids=[e.episode_id for e in episodes],
            paths=paths,
            returns=returns,
            success=success,
            similarity=similarity,
            episodes=tuple(episodes),
        )

    @classmethod
    def _from_paths(
        cls,
        group_id: str,
        task_id: str,
        episode_ids: Sequence[str],
        paths: Sequence[Sequence[str]],
        returns: Sequence[float] | None,
        success: Sequence[bool] | None,
        similarity: float | None,
        episodes: tuple[Episode, ...] = (),
        edges: dict[str, tuple[str, str]] | None = None,
    ) -> TrajectoryGraph:
        n = len(paths)
        for name, values in (("returns", returns), ("success", success)):
            if values is not None and len(values) != n:
                raise ValueError(f"{len(values)} {name} for {n} episodes")
        return cls(
            group_id=group_id,
            task_id=task_id,
            episode_ids=tuple(episode_ids),
            paths=tuple(tuple(p) for p in paths),
            returns=None if returns is None else tuple(float(r) for r in returns),
            success=None if success is None else tuple(bool(s) for s in success),
            similarity=similarity,
            episodes=episodes,
            _edges=dict(edges or {}),
        )

    # --- reading ------------------------------------------------------------------------

    @property
    def _order(self) -> dict[str, tuple[str | None, int, int]]:
        """key -> (parent key, depth, representative episode index), in order of first
        visit."""
        order: dict[str, tuple[str | None, int, int]] | None = self._cache.get("order")
        if order is not None:
            return order
        order = {ROOT: (None, 0, 0)}
        for i, path in enumerate(self.paths):
            parent = ROOT
            for depth, key in enumerate(path, 1):
                if key not in order:
                    order[key] = (parent, depth, i)
                elif order[key][0] != parent:
                    raise ValueError(f"node {key} reached from two parents")
                parent = key
        self._cache["order"] = order
        return order

    def __len__(self) -> int:
        """Number of nodes, the root included."""
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __eq__(self, other: object) -> bool:
        """Same structure, statistics and texts (the attached episodes are not compared)."""
        if not isinstance(other, TrajectoryGraph):
            return NotImplemented
        return self._state() == other._state()

    __hash__ = None  # type: ignore[assignment]

    def _state(self) -> tuple[object, ...]:
        return (
            self.group_id,
            self.task_id,
            self.episode_ids,
            self.paths,
            self.returns,
            self.success,
            self.similarity,
            self.nodes,
        )

    @property
    def root(self) -> Node:
        return self.node(ROOT)

    def state_keys(self) -> list[list[str]]:
        """Per episode, the node each turn starts from (as `state_keys`, with this graph's
        merging: use these for step groups when the similarity merge is on)."""
        return [[ROOT, *p[:-1]] if p else [] for p in self.paths]

    def node(self, key: str) -> Node:
        """The node with `key`; KeyError names it when the graph has no such state."""
        nodes = self.nodes
        if key not in nodes:
            raise KeyError(f"no state {key!r} in the graph of group {self.group_id!r}")
        return nodes[key]

    @property
    def nodes(self) -> dict[str, Node]:
        """Every node by key, the root first, then in order of first visit (computed once)."""
        cached: dict[str, Node] | None = self._cache.get("nodes")
        if cached is not None:
            return cached
        visits: Counter[str] = Counter()
        ends: Counter[str] = Counter()
        members: dict[str, list[int]] = defaultdict(list)
        ret_sum: dict[str, float] = defaultdict(float)
        ok_sum: dict[str, int] = defaultdict(int)
        for i, path in enumerate(self.paths):
            through = (ROOT, *path)
            visits.update(through)
            ends[through[-1]] += 1
            for key in through:
                members[key].append(i)
            if self.returns is not None:
                for key in through:
                    ret_sum[key] += self.returns[i]
            if self.success is not None:
                for key in through:
                    ok_sum[key] += self.success[i]
        children: dict[str, dict[str, list[str]]] = defaultdict(dict)
        for key, (parent, _, _) in self._order.items():
            if parent is not None:
                children[parent].setdefault(self._edge(key)[0], []).append(key)
        nodes = {}
        for key, (parent, depth, _) in self._order.items():
            v = visits[key]
            action, observation = self._edge(key) if parent is not None else ("", "")
            nodes[key] = Node(
                key=key,
                parent=parent,
                depth=depth,
                action=action,
                observation=observation,
                visits=v,
                ends=ends[key],
                mean_return=None if self.returns is None else ret_sum[key] / v,
                success_rate=None if self.success is None else ok_sum[key] / v,
                children={a: tuple(ks) for a, ks in children[key].items()},
                episodes=tuple(members[key]),
            )
        self._cache["nodes"] = nodes
        return nodes

    def _edge(self, key: str) -> tuple[str, str]:
        edge = self._edges.get(key)
        if edge is None:
            _, depth, i = self._order[key]
            if not self.episodes:
                raise ValueError(f"no text for node {key}: the graph has no episodes")
            turn = self.episodes[i].turns[depth - 1]
            edge = self._edges[key] = (action_key(turn), observation_key(turn))
        return edge

    # --- branching ----------------------------------------------------------------------

    def prefix(self, key: str) -> tuple[Turn, ...]:
        """The stored turns that lead to node `key`: the first `depth` turns of the first
        episode through it whose turn `depth - 1` can be continued (it did not answer, and an
        observation followed it). ValueError for a terminal node."""
        node = self.node(key)
        if node.depth == 0:
            return ()
        if not self.episodes:
            raise ValueError("branching needs the graph's episodes (build it from them)")
        for i in node.episodes:
            turns = self.episodes[i].turns
            if _continuable(turns[node.depth - 1]):
                return tuple(turns[: node.depth])
        raise ValueError(
            f"state {key} is terminal: every episode that reached it answered or was cut off "
            "there, so no turn can follow it"
        )

    def branch_spec(self, key: str, base_spec: EpisodeSpec) -> EpisodeSpec:
        """`base_spec` (a fresh episode id, the seed, the step) starting from node `key`: the
        runner restores the prefix's token ids exactly and replays its tool calls into the new
        episode's tool sessions, then samples turn `depth` onwards (`EpisodeSpec.prefix`).
        Sibling branches of one node need their own episode ids and seeds."""
        return replace(base_spec, prefix=self.prefix(key))

    # --- JSON ---------------------------------------------------------------------------

    def to_json(self, indent: int | None = None) -> str:
        """The graph as JSON, for viewers and for `from_json`. Schema (`schema` =
        `turnrl.trajectory_graph/1`):

            {"schema", "group_id", "task_id", "similarity": float | null, "root": "root",
             "episodes": [{"episode_id", "path": [key after each turn],
                           "return": float | null, "success": bool | null}],
             "nodes": [{"key", "parent": key | null, "depth", "action", "observation",
                        "visits", "ends", "mean_return": float | null,
                        "success_rate": float | null,
                        "children": {action: [key, ...]}, "episodes": [index, ...]}]}

        Nodes come root first, then in order of first visit; `episodes` indices point into the
        top-level `episodes` list. Keys are stable across processes. Every field of a node is
        derived from the episodes' paths except its action and observation texts."""
        eps = [
            {
                "episode_id": eid,
                "path": list(path),
                "return": None if self.returns is None else self.returns[i],
                "success": None if self.success is None else self.success[i],
            }
            for i, (eid, path) in enumerate(zip(self.episode_ids, self.paths, strict=True))
        ]
        nodes = [
            {
                "key": n.key,
                "parent": n.parent,
                "depth": n.depth,
                "action": n.action,
                "observation": n.observation,
                "visits": n.visits,
                "ends": n.ends,
                "mean_return": n.mean_return,
                "success_rate": n.success_rate,
                "children": {a: list(ks) for a, ks in n.children.items()},
                "episodes": list(n.episodes),
            }
            for n in self.nodes.values()
        ]
        doc = {
            "schema": SCHEMA,
            "group_id": self.group_id,
            "task_id": self.task_id,
            "similarity": self.similarity,
            "root": ROOT,
            "episodes": eps,
            "nodes": nodes,
        }
        return json.dumps(doc, ensure_ascii=False, indent=indent)

    @classmethod
    def from_json(cls, text: str, episodes: Sequence[Episode] = ()) -> TrajectoryGraph:
        """A graph from `to_json` output. `episodes` (the same ones, same order) may be
        attached to branch from it. The node statistics are recomputed from the paths and
        checked against the stored ones: ValueError on a file that disagrees with itself."""
        doc = json.loads(text)
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document (schema={doc.get('schema')!r})")
        eps = doc["episodes"]
        returns = [e["return"] for e in eps]
        success = [e["success"] for e in eps]
        graph = cls._from_paths(
            group_id=doc["group_id"],
            task_id=doc["task_id"],
            episode_ids=[e["episode_id"] for e in eps],
            paths=[e["path"] for e in eps],
            returns=None if any(r is None for r in returns) else returns,
            success=None if any(s is None for s in success) else success,
            similarity=doc["similarity"],
            episodes=tuple(episodes),
            edges={n["key"]: (n["action"], n["observation"]) for n in doc["nodes"]},
        )
        if episodes and tuple(e.episode_id for e in episodes) != graph.episode_ids:
            raise ValueError("the attached episodes are not the graph's (ids or order differ)")
        stored = [n["key"] for n in doc["nodes"]]
        if stored != list(graph.nodes) or any(
            graph.node(n["key"]).visits != n["visits"] for n in doc["nodes"]
        ):
            raise ValueError("the stored nodes do not match the stored episode paths")
        return graph


def _continuable(turn: Turn) -> bool:
    # An answer to a user message that has a followup is continued by that followup (its
    # observation); a final answer or a cut-off turn has none.
    return bool(turn.observation_ids)


def _merged_paths(episodes: Sequence[Episode], threshold: float) -> list[tuple[str, ...]]:
    """Paths with the similarity merge (module docstring): exact keys chained from each
    turn's (possibly merged) parent; a new key joins its most similar sibling if one is close
    enough."""
    known: set[str] = {ROOT}
    siblings: dict[tuple[str, str], list[tuple[str, frozenset[str]]]] = defaultdict(list)
    paths = []
    for episode in episodes:
        parent = ROOT
        path = []
        for turn in episode.turns:
            key = chain_key(parent, turn)
            if key not in known:
                slot = siblings[parent, action_key(turn)]
                shingles = _shingles(observation_key(turn))
                best, best_sim = None, -1.0
                for other, other_shingles in slot:
                    sim = jaccard(shingles, other_shingles)
                    if sim >= threshold and sim > best_sim:
                        best, best_sim = other, sim
                if best is None:
                    known.add(key)
                    slot.append((key, shingles))
                else:
                    key = best
            path.append(key)
            parent = key
        paths.append(tuple(path))
    return paths
