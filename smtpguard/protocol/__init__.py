"""The sans-I/O SMTP core: standard library only, no trio, no sockets."""

from .rules import Phase, State, Verb
from .session import Session, SessionOptions

__all__ = ["Phase", "Session", "SessionOptions", "State", "Verb"]
