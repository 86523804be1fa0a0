"""Which run artefacts this user's featurepipe wrote: an HMAC under a per-user secret key.

A joblib head is a pickle: loading it can run any code it names. Its sha256 in best_head.json only
proves the file matches the JSON, and anyone who can edit one can edit the other. The HMAC below is
keyed by a secret that never leaves this user's key file, so a head that was edited, or a run copied
from another user or machine, is refused (unless the user says `--trust`).

Why the key is per user and not inside the cache root: a run records its cache root in its own
config.json, so a run crafted elsewhere could point at a cache holding a key of its making.
The key file is $FEATUREPIPE_KEY_FILE, else $XDG_CONFIG_HOME/featurepipe/trust.key (~/.config/...).
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from hashlib import sha256
from pathlib import Path

from featurepipe.core.errors import FeaturepipeError, TrustError

KEY_ENV = "FEATUREPIPE_KEY_FILE"
_DOMAIN = b"featurepipe-artefact-v1\n"


def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "featurepipe" / "trust.key"


def _create_key(path: Path) -> None:
    """Write a new random key readable by this user only; concurrent creators agree on one key
    (each writes its own temporary file; link() refuses to replace the winner's)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _key() -> bytes:
    path = key_path()
    if not path.exists():
        try:
            _create_key(path)
        except OSError as error:
            raise FeaturepipeError(f"cannot create the key that signs run artefacts at {path} ({error}); "
                                   f"set ${KEY_ENV} to a writable file path") from None
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TrustError(f"the signing key {path} is readable or writable by others (or not yours), so "
                         f"signatures made with it prove nothing; run `chmod 600 {path}` if it is yours, "
                         f"or delete it (runs signed with it then need --trust once)")
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise TrustError(f"the signing key {path} is damaged (too short); delete it and re-run "
                         f"`featurepipe evaluate` for the runs you need")
    return key


def sign(name: str, digest: str) -> str:
    """HMAC-SHA256 of an artefact's file name (relative to its folder) and content sha256."""
    return hmac.new(_key(), _DOMAIN + f"{name}\n{digest}".encode(), sha256).hexdigest()


def signed(name: str, digest: str, mac) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(sign(name, digest), mac)


def confined(folder: Path, name) -> Path:
    """`folder/name` for a name read from an editable file: only a relative path that stays inside
    `folder` once `..` and symlinks are resolved, and names a regular file (or nothing yet)."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or "\x00" in name:
        raise TrustError(f"{folder} names an artefact {name!r} that is not a relative path inside the run "
                         f"folder; refusing to load it (the run's JSON was edited?)")
    path = folder / name
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise TrustError(f"{folder}: artefact {name!r} resolves to {resolved}, outside the run folder; refusing "
                         f"to load it (the run's JSON was edited, or a symlink points out)")
    if resolved.exists() and not resolved.is_file():
        raise TrustError(f"{path} is not a regular file; refusing to load it")
    return path
