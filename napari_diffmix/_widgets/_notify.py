"""User errors as napari notifications.

A :class:`~napari_diffmix.errors.DiffMixError` is the user's to fix (a wrong file, a scheme
mismatch, nothing selected): it becomes an error notification with its message and nothing
else. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from ..errors import DiffMixError

F = TypeVar("F", bound=Callable[..., Any])


def notify_error(exc: BaseException | str) -> None:
    from napari.utils.notifications import show_error

    show_error(str(exc))


def user_errors(func: F) -> F:
    """Decorate a UI callback: DiffMixError -> notification, return None."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DiffMixError as exc:
            notify_error(exc)
            return None

    return wrapper  # type: ignore[return-value]
