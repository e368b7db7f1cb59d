"""The key/value store: reads in Consul's shapes, writes with Consul's semantics.

Every write is one `Change` (one index, one transaction) and touches
`kv:<key>` for each key it writes or deletes, so a blocking read of a key
waits on `kv:<key>` and a recursive read of a prefix waits on the prefix
topic `kv:<prefix>`. Deletes leave their topic row behind, so a read's index
never goes backwards (Consul keeps tombstones for the same reason).

Locks follow Consul's state store: `acquire` succeeds when the key is
unlocked or already held by that session (a new holder bumps `LockIndex`),
`release` only by the holder, and a plain write never changes who holds a
key. After a session is invalidated, its keys cannot be acquired for the
session's lock-delay (see `LockDelays`).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction

from registry import topics as topic
from registry.errors import BadRequest, TooLarge
from registry.models import KVEntry, Session
from registry.txn import Change, prefix_index, topic_index

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 2048  # KVEntry.key's column size
UINT64_MAX = 2**64 - 1
# Consul caps every session's lock-delay at 60 s (structs.MaxLockDelay).
MAX_LOCK_DELAY_SECONDS = 60.0


# --- keys, flags and values --------------------------------------------------------


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Refuse keys Consul refuses or that the database cannot store, with a 400.

    `allow_empty` is for prefix operations (`?recurse`, `?keys`, recursive
    delete), where the empty key means "the whole store".
    """
    if key == "":
        if allow_empty:
            return key
        raise BadRequest("Missing key name")
    if key.startswith("/"):
        raise BadRequest("Invalid key: must not begin with a '/'")
    if "\x00" in key:
        raise BadRequest("Invalid key: must not contain a NUL character")
    if "\ufffd" in key:
        # What an undecodable byte turns into on the way in: refuse rather than
        # store a key the client did not send.
        raise BadRequest("Invalid key: must be valid UTF-8")
    if len(key) > MAX_KEY_LENGTH:
        raise BadRequest(f"Invalid key: longer than {MAX_KEY_LENGTH} characters")
    return key


def key_from_raw_path(raw: bytes, prefix: bytes = b"/v1/kv/") -> str:
    """The key as the client sent it (percent-decoded), refusing non-UTF-8 bytes.

    Servers decode the path leniently (an invalid byte becomes U+FFFD), so
    the raw path is the only place a non-UTF-8 key can be told apart.
    """
    from urllib.parse import unquote_to_bytes

    if not raw.startswith(prefix):
        raise BadRequest("Missing key name")
    try:
        return unquote_to_bytes(raw[len(prefix) :]).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Invalid key: must be valid UTF-8") from None


def parse_uint64(name: str, raw: str) -> int:
    """A `?flags=` / `?cas=` value: an unsigned 64-bit integer, else a 400."""
    text = raw.strip()
    if not text.isdigit():  # also refuses "", "-1", "+1", "1.0"
        raise BadRequest(f"Invalid value for ?{name}: {raw!r} is not an unsigned integer")
    value = int(text)
    if value > UINT64_MAX:
        raise BadRequest(f"Invalid value for ?{name}: {raw!r} is out of range")
    return value


def _flags_to_db(flags: int) -> int:
    # The column is a signed 64-bit integer; Consul's flags are unsigned.
    # Store the same 64 bits (two's complement) and convert back on read.
    return flags - 2**64 if flags >= 2**63 else flags


def _flags_from_db(stored: int) -> int:
    return stored + 2**64 if stored < 0 else stored


def check_value_size(length: int) -> None:
    """Consul's `kv_max_value_size` (MESH_KV_MAX_VALUE_SIZE), with Consul's 413 text."""
    limit = settings.MESH_KV_MAX_VALUE_SIZE
    if length > limit:
        raise TooLarge(
            f"Request body({length} bytes) too large, max size: {limit} bytes. See "
            "https://developer.hashicorp.com/consul/docs/agent/config/config-files#kv_max_value_size."
        )


def _value_bytes(entry: KVEntry) -> bytes:
    return bytes(entry.value) if entry.value is not None else b""


def entry_json(entry: KVEntry) -> dict[str, Any]:
    """One entry as `GET /v1/kv/<key>` shows it (`Session` only while locked)."""
    value = _value_bytes(entry)
    out: dict[str, Any] = {
        "Key": entry.key,
        "Flags": _flags_from_db(entry.flags),
        # Consul stores an empty body as a nil value, which JSON shows as null.
        "Value": base64.b64encode(value).decode("ascii") if value else None,
        "LockIndex": entry.lock_index,
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    }
    if entry.session_id:
        out["Session"] = entry.session_id
    return out


# --- reads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """A prefix read: its index, what the caller may see, and whether ACLs hid some."""

    index: int
    items: list
    filtered: bool = False


def key_topic(key: str) -> str:
    return topic.kv(key)


def get(key: str) -> tuple[int, KVEntry | None]:
    """One key and the index to block on (its topic's; 1 for a key never written)."""
    entry = KVEntry.objects.filter(key=key).first()
    return max(topic_index(key_topic(key)), 1), entry


def _under(prefix: str) -> list[KVEntry]:
    # `startswith` is case-insensitive on SQLite: narrow in SQL, decide in
    # Python. Sort by code point (Consul's byte order), not the DB's collation.
    rows = KVEntry.objects.filter(key__startswith=prefix) if prefix else KVEntry.objects.all()
    return sorted((e for e in rows if e.key.startswith(prefix)), key=lambda e: e.key)


def list_prefix(authz, prefix: str) -> Listing:
    """Every entry under `prefix` the caller may read (Consul's `?recurse`)."""
    index = max(prefix_index(key_topic(prefix)), 1)
    entries = _under(prefix)
    visible = [e for e in entries if authz.key_read(e.key)]
    return Listing(index, visible, filtered=len(visible) != len(entries))


def list_keys(authz, prefix: str, separator: str = "") -> Listing:
    """Key names under `prefix` (Consul's `?keys`), folded at `separator`.

    With a separator, a key with the separator after the prefix is cut just
    after its first occurrence and listed once ("a/b/c" under "a/" with "/"
    is "a/b/"), as Consul's KVS.ListKeys does.
    """
    listing = list_prefix(authz, prefix)
    keys: list[str] = []
    seen: set[str] = set()
    for entry in listing.items:
        key = entry.key
        if separator:
            cut = key.find(separator, len(prefix))
            if cut >= 0:
                key = key[: cut + len(separator)]
                if key in seen:
                    continue
                seen.add(key)
        keys.append(key)
    return Listing(listing.index, keys, listing.filtered)


# --- lock-delay ---------------------------------------------------------------------------


class LockDelays:
    """When each key may be acquired again after its session was invalidated.

    Kept outside the database on purpose. Consul keeps lock-delays in the
    leader's memory only (not in Raft: it is wall-clock state, lost on a
    leader change), and adding a table here would mean a migration racing
    every other schema change. So:

    * embedded (no Redis): a dict in this process, which is the only process
      that serves HTTP and runs the background tick, so it is exact;
    * with Redis (several servers, Celery workers): one Redis key per KV key
      with the delay as its expiry (`SET ... PX`), so an invalidation made by
      a worker (TTL expiry, a check going critical) is enforced by every
      server. If Redis cannot be reached the delay is skipped (logged), which
      is what Consul does after a leader change.
    """

    def __init__(self) -> None:
        self._local: dict[str, float] = {}
        self._lock = threading.Lock()

    def _redis(self):
        from registry import changes

        return changes._redis()

    @staticmethod
    def _redis_key(key: str) -> str:
        from registry import changes

        # One namespace per database, as the change channel: test servers and
        # unrelated clusters may share one Redis.
        return "meshweb:kv-lock-delay:" + changes.channel().rsplit(":", 1)[-1] + ":" + key

    def set(self, keys: Iterable[str], seconds: float) -> None:
        """Refuse acquiring `keys` for the next `seconds`."""
        keys = list(keys)
        if seconds <= 0 or not keys:
            return
        client = self._redis()
        if client is not None:
            try:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.set(self._redis_key(key), b"1", px=max(int(seconds * 1000), 1))
                pipe.execute()
                return
            except Exception as exc:
                log.warning("could not record KV lock-delay on Redis: %s", exc)
                return
        deadline = time.monotonic() + seconds
        with self._lock:
            now = time.monotonic()
            if len(self._local) > 10_000:  # forget lapsed delays now and then
                self._local = {k: d for k, d in self._local.items() if d > now}
            for key in keys:
                self._local[key] = max(deadline, self._local.get(key, 0.0))

    def remaining(self, key: str) -> float:
        """Seconds until `key` may be acquired again (0 when it may be now)."""
        client = self._redis()
        if client is not None:
            try:
                ms = client.pttl(self._redis_key(key))
            except Exception as exc:
                log.warning("could not read KV lock-delay from Redis: %s", exc)
                return 0.0
            return ms / 1000 if ms and ms > 0 else 0.0
        with self._lock:
            deadline = self._local.get(key)
        if deadline is None:
            return 0.0
        return max(deadline - time.monotonic(), 0.0)

    def clear(self) -> None:
        """Forget every in-process delay (tests)."""
        with self._lock:
            self._local.clear()


lock_delays = LockDelays()


def apply_lock_delay(keys: Iterable[str], lock_delay_ns: int) -> None:
    """After the current transaction commits, hold `keys` for the session's lock-delay."""
    seconds = min(max(lock_delay_ns, 0) / 1e9, MAX_LOCK_DELAY_SECONDS)
    keys = list(keys)
    if seconds > 0 and keys:
        transaction.on_commit(lambda: lock_delays.set(keys, seconds))


# --- writes -------------------------------------------------------------------------------


def _audit_state(entry: KVEntry) -> dict[str, Any]:
    """An entry as the audit log records it (the value is described there, never kept)."""
    return {
        "Key": entry.key,
        "Flags": _flags_from_db(entry.flags),
        "Session": entry.session_id or None,
        "LockIndex": entry.lock_index,
        "Value": _value_bytes(entry) if entry.value is not None else None,
    }


def _save(change: Change, entry: KVEntry, *, created: bool) -> None:
    entry.modify_index = change.index
    if created:
        entry.create_index = change.index
    entry.save()
    change.touch(key_topic(entry.key))
    change.audit("kv.set", "kv", entry.key, None, _audit_state(entry))


def put(
    key: str,
    value: bytes,
    *,
    flags: int = 0,
    cas: int | None = None,
    acquire: str | None = None,
    release: str | None = None,
) -> bool:
    """`PUT /v1/kv/<key>`: set, check-and-set, acquire or release; True if it took effect.

    A plain set always answers True; `cas`, `acquire` and `release` answer
    whether they happened. An unknown session for `acquire` is a 400 and
    nothing is written.
    """
    validate_key(key)
    check_value_size(len(value))
    if sum(x is not None for x in (cas, acquire, release)) > 1:
        raise BadRequest("Conflicting flags: use only one of ?cas, ?acquire and ?release")
    if not 0 <= flags <= UINT64_MAX:
        raise BadRequest("Invalid value for ?flags: out of range")
    if acquire is not None:
        return _acquire(key, value, flags, acquire)
    if release is not None:
        return _release(key, value, flags, release)
    stored_flags = _flags_to_db(flags)
    stored_value = value or None
    with Change() as change:
        entry = KVEntry.objects.select_for_update().filter(key=key).first()
        if cas is not None:
            if cas == 0 and entry is not None:
                return False
            if cas != 0 and (entry is None or entry.modify_index != cas):
                return False
        if entry is None:
            entry = KVEntry(key=key, flags=stored_flags, value=stored_value)
            _save(change, entry, created=True)
            return True
        if entry.flags == stored_flags and _value_bytes(entry) == value:
            # Consul skips writing an unchanged entry: its ModifyIndex stays
            # and no watcher wakes.
            return True
        entry.flags, entry.value = stored_flags, stored_value
        _save(change, entry, created=False)
        return True


def _acquire(key: str, value: bytes, flags: int, session_id: str) -> bool:
    if not session_id:
        raise BadRequest("Missing session: ?acquire needs a session ID")
    with Change() as change:
        # Writers are serialised by the global index row (see txn.next_index),
        # so the session cannot end between this check and the write below;
        # the row lock keeps that true should writers ever run side by side.
        if Session.objects.select_for_update().filter(id=session_id).first() is None:
            raise BadRequest(f'Invalid session "{session_id}": no such session')
        if lock_delays.remaining(key) > 0:
            # Consul answers false (and logs) while a lock-delay holds.
            log.info("refusing to lock %r during its lock-delay", key)
            return False
        entry = KVEntry.objects.select_for_update().filter(key=key).first()
        created = entry is None
        if created:
            entry = KVEntry(key=key, lock_index=1)
        elif entry.session_id == session_id:
            pass  # already ours: LockIndex stays
        elif entry.session_id:
            return False  # someone else holds it
        else:
            entry.lock_index += 1
        entry.session_id = session_id
        entry.flags, entry.value = _flags_to_db(flags), value or None
        _save(change, entry, created=created)
        return True


def _release(key: str, value: bytes, flags: int, session_id: str) -> bool:
    if not session_id:
        raise BadRequest("Missing session: ?release needs a session ID")
    with Change() as change:
        entry = KVEntry.objects.select_for_update().filter(key=key).first()
        if entry is None or entry.session_id != session_id:
            return False  # only the holder releases (an unknown session holds nothing)
        entry.session_id = None
        entry.flags, entry.value = _flags_to_db(flags), value or None
        _save(change, entry, created=False)
        return True


def delete(key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
    """`DELETE /v1/kv/<key>`: one key, a prefix (`recurse`) or check-and-delete (`cas`).

    Answers True except for a `cas` that did not match; like Consul, a `cas`
    delete of a key that does not exist answers True.
    """
    validate_key(key, allow_empty=recurse)
    if recurse and cas is not None:
        raise BadRequest("Conflicting flags: use only one of ?recurse and ?cas")
    with Change() as change:
        if recurse:
            doomed = _under(key)
            if doomed:
                KVEntry.objects.filter(pk__in=[e.pk for e in doomed]).delete()
                change.touch(*(key_topic(e.key) for e in doomed))
                listed = [e.key for e in doomed[:100]]
                change.audit(
                    "kv.delete-tree", "kv", key, {"Count": len(doomed), "Keys": listed}, None
                )
            return True
        entry = KVEntry.objects.select_for_update().filter(key=key).first()
        if entry is None:
            return True
        if cas is not None and entry.modify_index != cas:
            return False
        before = _audit_state(entry)
        entry.delete()
        change.touch(key_topic(key))
        change.audit("kv.delete", "kv", key, before, None)
        return True
