"""Pages of a listing sorted by name, with a token that survives concurrent changes.

The token names the last item returned (keyset paging), not an offset: the next page starts
after that name in the listing as it is *then*. So a task that exists throughout the listing
appears exactly once even while others are registered or deleted, and an added task at most
once. The token is opaque to clients (base64url), and bound to the listing it came from.
"""
from __future__ import annotations

import base64
import binascii
from bisect import bisect_right
from typing import Sequence, TypeVar

from promptmux.prompts.errors import InvalidRequestError

MAX_PAGE_SIZE = 1000
_VERSION = "p1"

T = TypeVar("T")


def make_token(listing: str, last_name: str) -> str:
    raw = f"{_VERSION}\n{listing}\n{last_name}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_token(listing: str, token: str) -> str:
    """The last name the previous page returned."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, token_listing, last_name = raw.split("\n", 2)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        version, token_listing, last_name = "", "", ""
    if version != _VERSION or token_listing != listing:
        raise InvalidRequestError(
            f"page_token {token[:40]!r} is not a token this listing returned; send the next_page_token of the "
            "previous reply unchanged (with the same request fields), or an empty page_token for the first page"
        )
    return last_name


def page(items: Sequence[tuple[str, T]], page_size: int, page_token: str, listing: str) -> tuple[list[T], str]:
    """(this page's items, next token or "") of `items`, (name, item) pairs sorted by name.
    `page_size` 0 returns everything after the token; larger than MAX_PAGE_SIZE counts as it."""
    start = 0
    if page_token:
        after = read_token(listing, page_token)
        start = bisect_right([name for name, _ in items], after)
    if page_size <= 0:
        return [item for _, item in items[start:]], ""
    end = start + min(page_size, MAX_PAGE_SIZE)
    chosen = items[start:end]
    next_token = make_token(listing, chosen[-1][0]) if end < len(items) and chosen else ""
    return [item for _, item in chosen], next_token
