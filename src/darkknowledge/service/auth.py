"""API tokens: shown once at creation, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import DKError
from .db import Token

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PREFIX = "dk_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(db: Session, name: str) -> str:
    """A new token for ``name``; the caller shows it once, the database keeps its hash."""
    if not _NAME.match(name):
        raise DKError(f"token name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    if db.scalar(select(Token).where(Token.name == name)) is not None:
        raise DKError(f"a token named {name!r} exists; pick another name or revoke it first")
    token = PREFIX + secrets.token_urlsafe(32)
    db.add(Token(name=name, token_hash=hash_token(token)))
    db.commit()
    return token


def find_token(db: Session, token: str | None) -> Token | None:
    if not token or len(token) > 200:
        return None
    return db.scalar(select(Token).where(Token.token_hash == hash_token(token)))


def revoke_token(db: Session, name: str) -> None:
    tok = db.scalar(select(Token).where(Token.name == name))
    if tok is None:
        raise DKError(f"no token named {name!r}")
    # its jobs and datasets stay (and stay invisible: nobody else owns them)
    tok.token_hash = "revoked:" + secrets.token_hex(24)
    db.commit()
