"""What every layer needs to say about an error, with no dependencies of its own."""

from __future__ import annotations


def innermost(exc: BaseException) -> BaseException:
    """The first real error inside the exception groups task groups wrap it in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
