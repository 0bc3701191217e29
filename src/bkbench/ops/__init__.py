"""Custom operators of bkbench."""

from .bk_core import bk_core_flops, resolvent_diag

__all__ = ["resolvent_diag", "bk_core_flops"]
