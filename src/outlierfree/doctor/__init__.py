"""``outlierfree doctor``: will this checkpoint survive W8A8, where does it break, and which fix works (see
:mod:`.run`: ``diagnose(DoctorRequest(...)) -> DoctorResult``)."""

from .run import DoctorRequest, DoctorResult, diagnose

__all__ = ["DoctorRequest", "DoctorResult", "diagnose"]
