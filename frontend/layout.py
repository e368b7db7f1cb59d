"""A fast layered layout for large service graphs (pure; no Django).

Dagre (vendored, used in the browser for small graphs) spends seconds in its
crossing minimisation once a mesh has a few hundred edges. This is the same
idea, cut down: break cycles, rank by distance from the sources, order
each rank by the barycentre of its neighbours for a few sweeps, and place the
ranks as columns (left to right, as calls flow). Tens of milliseconds for 200
services. Cycles are broken by DFS, levels are breadth-first from the
sources, and a column taller than `MAX_ROWS` wraps into several.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

NODE_HEIGHT = 30
ROW_GAP = 14
COLUMN_GAP = 110
CHAR_WIDTH = 7
MARGIN = 20
SWEEPS = 4
MAX_ROWS = 25


def node_width(name: str) -> int:
    return max(90, len(name) * CHAR_WIDTH + 24)


def _acyclic(nodes: list[str], edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The edges with those that close a cycle (found by DFS) turned around."""
    out = defaultdict(list)
    for a, b in edges:
        out[a].append(b)
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    back: set[tuple[str, str]] = set()
    for root in nodes:
        if root in state:
            continue
        stack = [(root, iter(sorted(out[root])))]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            nxt = next(children, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(out[nxt]))))
    return [(b, a) if (a, b) in back else (a, b) for a, b in edges if a != b]


def layered(
    nodes: Iterable[str], edges: Iterable[tuple[str, str]]
) -> tuple[dict[str, tuple[int, int, int, int]], int, int]:
    """({node: (x, y, width, height)}, total width, total height); x, y at the top left."""
    names = sorted(set(nodes))
    dag = _acyclic(names, [(a, b) for a, b in edges if a in names and b in names])
    preds = defaultdict(list)
    succs = defaultdict(list)
    for a, b in dag:
        succs[a].append(b)
        preds[b].append(a)
    # Breadth-first levels from the sources: a dense, cyclic mesh stays a few
    # columns wide instead of one long chain (the longest path's answer).
    rank: dict[str, int] = {}
    frontier = [n for n in names if not preds[n]]
    level = 0
    while frontier:
        for n in frontier:
            rank[n] = level
        level += 1
        frontier = sorted({m for n in frontier for m in succs[n] if m not in rank})
    columns: dict[int, list[str]] = defaultdict(list)
    for n in names:
        columns[rank[n]].append(n)
    # Tall columns wrap into several, so the page stays wide rather than endless.
    wrapped: dict[int, list[str]] = {}
    for r in sorted(columns):
        col = columns[r]
        for i in range(0, len(col), MAX_ROWS):
            wrapped[len(wrapped)] = col[i : i + MAX_ROWS]
    columns = defaultdict(list, wrapped)
    position = {n: i for col in columns.values() for i, n in enumerate(col)}
    ranks = sorted(columns)
    for sweep in range(SWEEPS):
        order = ranks[1:] if sweep % 2 == 0 else list(reversed(ranks[:-1]))
        for r in order:
            neighbours = preds if sweep % 2 == 0 else succs

            def centre(n: str, neighbours=neighbours) -> float:
                around = neighbours[n]
                if not around:
                    return float(position[n])
                return sum(position[m] for m in around) / len(around)

            columns[r].sort(key=lambda n: (centre(n), n))
            for i, n in enumerate(columns[r]):
                position[n] = i
    placed: dict[str, tuple[int, int, int, int]] = {}
    x = MARGIN
    height = 0
    for r in ranks:
        width = max(node_width(n) for n in columns[r])
        for i, n in enumerate(columns[r]):
            y = MARGIN + i * (NODE_HEIGHT + ROW_GAP)
            placed[n] = (x, y, node_width(n), NODE_HEIGHT)
            height = max(height, y + NODE_HEIGHT)
        x += width + COLUMN_GAP
    return placed, max(x - COLUMN_GAP + MARGIN, 0), height + MARGIN
