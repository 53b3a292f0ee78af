"""Sessions: the manager (start, verify, refresh, revoke, list), its tokens and their keys."""

from ductape_processor.runtime.sessions.keys import SessionKeys, new_root_key, parse_root_key
from ductape_processor.runtime.sessions.manager import RefreshConflict, SessionManager, TokenPair, VerifiedSession
from ductape_processor.runtime.sessions.tokens import SessionError

__all__ = [
    "RefreshConflict",
    "SessionError",
    "SessionKeys",
    "SessionManager",
    "TokenPair",
    "VerifiedSession",
    "new_root_key",
    "parse_root_key",
]
