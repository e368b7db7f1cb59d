"""Server-side paging for every UI list: `?page=` over any sliceable rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from django.http import HttpRequest

PER_PAGE = 50


@dataclass(frozen=True)
class Page:
    """One page of a list, and the links to its neighbours (filters kept)."""

    rows: list[Any]
    number: int
    per_page: int
    total: int
    query: dict[str, str]

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def first(self) -> int:
        return 0 if not self.total else (self.number - 1) * self.per_page + 1

    @property
    def last(self) -> int:
        return min(self.total, self.number * self.per_page)

    def _link(self, number: int) -> str:
        return "?" + urlencode({**self.query, "page": str(number)})

    @property
    def previous_link(self) -> str:
        return self._link(self.number - 1) if self.number > 1 else ""

    @property
    def next_link(self) -> str:
        return self._link(self.number + 1) if self.number < self.pages else ""


def page_number(request: HttpRequest) -> int:
    try:
        return max(1, int(request.GET.get("page", "1")))
    except ValueError:
        return 1


def filters(request: HttpRequest, names: tuple[str, ...]) -> dict[str, str]:
    """The request's non-empty filter values among `names`."""
    return {n: request.GET.get(n, "").strip() for n in names if request.GET.get(n, "").strip()}


def paginate(request: HttpRequest, rows: Any, query: dict[str, str], per_page: int = PER_PAGE):
    """A page of `rows` (a queryset is sliced in the database)."""
    number = page_number(request)
    total = rows.count() if hasattr(rows, "count") and not isinstance(rows, list) else len(rows)
    start = (number - 1) * per_page
    return Page(list(rows[start : start + per_page]), number, per_page, total, query)


def offset_page(request: HttpRequest, total: int, rows: list[Any], query: dict[str, str]) -> Page:
    """A page whose rows the caller fetched itself (`offset()`/`PER_PAGE`)."""
    return Page(rows, page_number(request), PER_PAGE, total, query)


def offset(request: HttpRequest, per_page: int = PER_PAGE) -> int:
    return (page_number(request) - 1) * per_page
