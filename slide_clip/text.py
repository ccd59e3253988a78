"""Wording shared by every message: counts with the right plural ("1 slide", "2 slides")."""

from __future__ import annotations

#: Nouns whose plural is not the noun + "s".
_IRREGULAR = {"patch": "patches", "class": "classes", "index": "indices", "query": "queries",
              "library": "libraries", "directory": "directories", "entry": "entries"}


def plural_of(noun: str) -> str:
    """The plural of an English noun used in our messages (``slide`` -> ``slides``)."""
    return _IRREGULAR.get(noun, noun + "s")


def plural(n, noun: str, many: str | None = None) -> str:
    """``n`` and the noun, singular for exactly one: ``plural(1, "slide")`` -> ``"1 slide"``.

    ``many`` overrides the plural form. ``n`` may be an int or a float (``1.0`` is one).
    """
    one = n == 1
    return f"{n} {noun if one else (many or plural_of(noun))}"
