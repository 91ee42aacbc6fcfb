"""Glob shadowing: a route whose every model pattern an earlier route already matches can never match.

Conservative on purpose: it reports only when certain (fnmatch has no escapes, so '*' and '?' are never
literal), comparing patterns token by token. Called by `config/loader.py` after routes are built.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from functools import cache

from proxy.config.model import Route, Tenant
from proxy.config.yamlread import Errors, Loc

def _glob_tokens(pattern: str) -> tuple[str, ...]:
    """fnmatch tokens: '*', '?', a whole '[...]' class, or one literal character (an unclosed '[' is one).

    Mirrors `fnmatch.translate`, which has no escape character, so '*' and '?' are never literal."""
    tokens: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        end = _class_end(pattern, i) if pattern[i] == "[" else -1
        if end == -1:
            tokens.append(pattern[i])
            i += 1
        else:
            tokens.append(pattern[i:end + 1])
            i = end + 1
    return tuple(tokens)


def _class_end(pattern: str, start: int) -> int:
    j = start + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    return pattern.find("]", j)


def _token_covers(outer: str, inner: str) -> bool:
    """Whether every character `inner` (not '*') can stand for is matched by the single-char token `outer`."""
    if inner == "*":
        return False
    if outer == "?":
        return True
    if len(outer) > 1:  # a class: covers a literal it matches, or the identical class
        return inner == outer or (len(inner) == 1 and inner != "?" and fnmatch.fnmatchcase(inner, outer))
    return inner == outer and inner != "?"


def glob_covers(outer: str, inner: str) -> bool:
    """True only when every name `inner` matches is also matched by `outer` (sound, not complete).

    Exact for a plain `inner` name; for an `inner` glob, each of its tokens must line up with a token of
    `outer` that covers it, and `outer`'s '*' may absorb any run of them (so 'llama*' covers 'llama-3*',
    but 'llama?' does not cover 'llama*')."""
    outer_tokens, inner_tokens = _glob_tokens(outer), _glob_tokens(inner)

    @cache
    def covers(i: int, j: int) -> bool:
        if i == len(outer_tokens):
            return j == len(inner_tokens)
        if outer_tokens[i] == "*":
            return covers(i + 1, j) or (j < len(inner_tokens) and covers(i, j + 1))
        if j == len(inner_tokens) or not _token_covers(outer_tokens[i], inner_tokens[j]):
            return False
        return covers(i + 1, j + 1)

    return covers(0, 0)


def _route_covers(earlier: Route, later: Route) -> bool:
    if earlier.tenants and not (later.tenants and later.tenants <= earlier.tenants):
        return False  # the tenants the earlier route leaves out still reach the later one
    if earlier.endpoints and not (later.endpoints and set(later.endpoints) <= set(earlier.endpoints)):
        return False
    return all(any(glob_covers(glob, model) for glob in earlier.models) for model in later.models)


def check_shadowing(routes: Sequence[tuple[Route, Loc]], errors: Errors, tenants: Sequence[Tenant] = ()) -> None:
    """Report each route an earlier one always takes first. A tenant the earlier route does not serve but
    the later one does (`match.tenants`, the tenant's `routes`) still reaches it: then it is no error."""
    for position, (later, loc) in enumerate(routes):
        for earlier, _ in routes[:position]:
            if _route_covers(earlier, later) and not any(
                    later.serves(tenant) and not earlier.serves(tenant) for tenant in tenants):
                errors.add(loc, f"route {later.name!r} can never match: route {earlier.name!r} "
                                f"({earlier.source}) matches every model it matches")
                break
