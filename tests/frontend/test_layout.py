"""The server-side layered layout for large topologies (pure, no browser)."""

from __future__ import annotations

from frontend.layout import MAX_ROWS, NODE_HEIGHT, layered


def test_it_places_every_service_without_overlap_even_with_cycles():
    names = [f"svc-{i:03d}" for i in range(200)]
    edges = [(names[i], names[(i * k + 1) % 200]) for i in range(200) for k in (3, 7, 11)]
    placed, width, height = layered(names, edges)
    assert set(placed) == set(names)
    columns: dict[int, list[int]] = {}
    for x, y, w, h in placed.values():
        assert x >= 0 and x + w <= width and y >= 0 and y + h <= height
        columns.setdefault(x, []).append(y)
    for ys in columns.values():
        ys.sort()
        assert len(ys) <= MAX_ROWS
        assert all(b - a >= NODE_HEIGHT for a, b in zip(ys, ys[1:], strict=False))


def test_calls_flow_left_to_right_in_an_acyclic_mesh():
    placed, _, _ = layered(
        ["web", "api", "db", "cache"], [("web", "api"), ("api", "db"), ("api", "cache")]
    )
    assert placed["web"][0] < placed["api"][0] < placed["db"][0]
    assert placed["db"][0] == placed["cache"][0]


def test_an_empty_graph_has_no_nodes():
    assert layered([], [])[0] == {}
