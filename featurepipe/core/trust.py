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
import json
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


# ---- signed records: the JSON that gives an artefact its meaning
#
# A head's file hash proves nothing about the classes its outputs are named by, the backbone and
# resize its features came from, or the cache they are read from: those live in JSON beside it.
# A record signature covers a whole JSON object (all but the signature itself), so swapping two
# class names or pointing a run at another cache is refused like an edited head. The domain differs
# from `sign`'s, so a record's signature never verifies as a file's (nor the other way round).
_RECORD_DOMAIN = b"featurepipe-record-v2\n"
SIGNATURE = "signature"     # the field that says which scheme signed a JSON file (absent: before records)
RECORD_V2 = 2


def _canonical(record: dict) -> bytes:
    """The bytes a record is signed as: its JSON as written and read back (write_json's default=str
    turns numpy numbers and paths into what is read later), keys sorted, no whitespace."""
    settled = json.loads(json.dumps(record, sort_keys=True, default=str))
    return json.dumps(settled, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_record(kind: str, record: dict, exclude: tuple[str, ...] = ("hmac",)) -> str:
    """HMAC-SHA256 of a JSON object of `kind` (a file name such as best_head.json), without the
    fields in `exclude` (its own signature)."""
    body = {k: v for k, v in record.items() if k not in exclude}
    return hmac.new(_key(), _RECORD_DOMAIN + kind.encode() + b"\n" + _canonical(body), sha256).hexdigest()


def signed_record(kind: str, record: dict, mac, exclude: tuple[str, ...] = ("hmac",)) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(sign_record(kind, record, exclude), mac)


def with_record_signature(kind: str, record: dict) -> dict:
    """`record` with its signature fields added (SIGNATURE: RECORD_V2, hmac: over all the rest)."""
    body = {k: v for k, v in record.items() if k != "hmac"}
    body[SIGNATURE] = RECORD_V2
    return {**body, "hmac": sign_record(kind, body)}


def writable(root: str | os.PathLike, relative: str, folder: bool = False) -> Path:
    """`root/relative` for writing, confined like `confined` is for reading: refused (TrustError,
    nothing written) when it, or a folder on the way to it, resolves outside `root`, which is how a
    symlinked `report/` or `finetune/` would make a run write over a user's files. `folder`: create it.

    Files are then written by core.atomic, whose rename replaces a link at the final name instead
    of writing through it; checking the final name too keeps writers that open paths themselves
    (Keras, TensorBoard) inside."""
    root = Path(root)
    real_root = root.resolve()
    current = root
    for part in Path(relative).parts:
        if part in ("..", "/") or Path(part).is_absolute():
            raise TrustError(f"{root}: {relative!r} is not a path inside the run folder; refusing to write it")
        current = current / part
        try:
            resolved = current.resolve()
        except (OSError, RuntimeError):     # a symlink loop
            raise TrustError(f"{current} is a symbolic link that loops; remove it (`rm {current}`) and run the "
                             f"command again") from None
        if resolved != real_root and real_root not in resolved.parents:
            raise TrustError(
                f"{current} is a symbolic link to {resolved}, outside the run folder {root}; featurepipe writes only "
                f"inside a run, so nothing was written there. Remove the link (`rm {current}`) and run the "
                f"command again, or use another --run-dir")
    if folder:
        current.mkdir(parents=True, exist_ok=True)
        writable(root, relative)      # created just now: check the folder that exists, not the plan
        # Some writers open their files themselves (Keras checkpoints, a history appended to): a link
        # at a file name inside the folder would be written through.
        for entry in current.iterdir():
            if entry.is_symlink():
                writable(root, str(Path(relative) / entry.name))
    return current
