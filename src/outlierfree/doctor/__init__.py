"""``outlierfree doctor``: will this checkpoint survive W8A8, where does it break, and which fix works (see
:mod:`.run`)."""

from .run import doctor

__all__ = ["doctor"]
