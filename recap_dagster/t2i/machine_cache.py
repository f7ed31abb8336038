"""One machine-local copy of each remote latent file, shared by every reader on the machine.

Each DataLoader worker of each training process on a machine is a *reader*: it reads the
whole global sample sequence (building only its own micro-batches), so every reader
enters every window. Per latent file, under one file lock (``filelock``):

- the first reader to need it downloads it (temp file + rename); the others wait on the
  lock and then use the finished copy: one GET per machine each time the file is needed;
- a sidecar ledger (``<copy>.refs.json``) records who holds the copy now (``holders``: one
  entry per reader and visit, so a prefetched next visit counts too) and how many visits
  of it each reader has left (``left``), per *session* (one run's readers, with the slots
  expected on the machine);
- the copy is deleted by the last reader out: no live holder, and every expected reader
  of every session has left as many visits as the furthest one (a reader about to come
  keeps the copy). Entries carry the process id and start time: a dead reader never
  blocks eviction, and a stale ledger of a killed run is dropped when the run is restarted.

By default only the ``mean`` tensor is fetched (ranged reads: the header, then its bytes)
and written as a safetensors file of its own; ``std`` only when the run samples latents.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from filelock import FileLock

from recap_dagster.storage.root import Storage

#: The first ranged read of a mean-only fetch: the header (10,000 keys at 512 px take about
#: 200 kB) and usually the start of ``mean``, which safetensors stores right after it.
HEAD_BYTES = 1 << 20
#: Later ranged reads of ``mean`` (bounded memory whatever the file's size).
CHUNK_BYTES = 64 << 20
LEDGER_SUFFIX = ".refs.json"
LOCK_SUFFIX = ".lock"

Identity = list  # [pid, start time]: a pid alone could be reused by another process


def process_identity(pid: int | None = None) -> Identity:
    """This (or ``pid``'s) process as ``[pid, start time]``."""
    pid = os.getpid() if pid is None else pid
    return [pid, psutil.Process(pid).create_time()]


def alive(identity: Identity) -> bool:
    """Whether the process ``identity`` names still runs (the same one, not a reused pid)."""
    pid, started = identity[0], identity[1]
    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass(frozen=True)
class Reader:
    """One reader of a session: ``slot`` is one of the session's ``slots`` on this machine
    (``"<local rank>.<worker>"``)."""

    session: str
    slot: str
    slots: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.session}/{self.slot}"


def fetch_mean_only(storage: Storage, parts: tuple[str, ...], local: str) -> None:
    """Write to ``local`` a safetensors file of the remote file's ``mean`` tensor and its
    metadata alone, fetched by ranged reads (atomically: temp file + rename)."""
    head = storage.read_bytes(*parts, start=0, end=HEAD_BYTES)
    size = int.from_bytes(head[:8], "little")
    if 8 + size > len(head):
        head += storage.read_bytes(*parts, start=len(head), end=8 + size)
    header = json.loads(head[8 : 8 + size])
    entry = header["mean"]
    begin, stop = (8 + size + offset for offset in entry["data_offsets"])
    out_header = {"mean": {**entry, "data_offsets": [0, stop - begin]}}
    if "__metadata__" in header:
        out_header["__metadata__"] = header["__metadata__"]
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    directory = os.path.dirname(local)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(local)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little") + encoded)
            done = begin
            if begin < len(head):  # the bytes of mean already read with the header
                piece = head[begin : min(stop, len(head))]
                out.write(piece)
                done += len(piece)
            while done < stop:
                end = min(stop, done + CHUNK_BYTES)
                out.write(storage.read_bytes(*parts, start=done, end=end))
                done = end
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class MachineCache:
    """Machine-local copies of one latent folder's files (see the module docstring)."""

    def __init__(
        self,
        storage: Storage,
        parts: tuple[str, ...],
        cache_dir: str,
        reader: Reader,
        *,
        mean_only: bool,
    ) -> None:
        self.storage = storage
        self.parts = parts  # the folder of the files under the storage root
        self.reader = reader
        self.mean_only = mean_only
        self.directory = Path(cache_dir, *parts)
        self.me = process_identity()

    # -- paths -------------------------------------------------------------------------
    def local_path(self, name: str) -> str:
        """The copy of ``name`` (``x.safetensors``; ``x.mean.safetensors`` for mean only)."""
        if self.mean_only:
            name = name.removesuffix(".safetensors") + ".mean.safetensors"
        return str(self.directory / name)

    @contextlib.contextmanager
    def _locked(self, local: str) -> Iterator[dict]:
        """The copy's ledger under its lock; written back when the block ends."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(local + LOCK_SUFFIX):
            ledger_path = Path(local + LEDGER_SUFFIX)
            ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
            for key in ("sessions", "holders", "left"):
                ledger.setdefault(key, {})
            yield ledger
            if not Path(local).exists():
                ledger_path.unlink(missing_ok=True)
                return
            tmp = ledger_path.with_name(ledger_path.name + ".tmp")
            tmp.write_text(json.dumps(ledger))
            os.replace(tmp, ledger_path)

    # -- one reader's visits -----------------------------------------------------------
    def acquire(self, name: str, visit: str) -> str:
        """Hold the copy of ``name`` for the visit ``visit`` (``"<epoch>.<window>"``),
        downloading it first if no reader on the machine has; returns its path."""
        local = self.local_path(name)
        me = self.reader
        with self._locked(local) as ledger:
            previous = ledger["left"].get(me.name)
            if previous is not None and previous[:2] != self.me and not alive(previous):
                # My slot was last held by a process now dead: a killed run of this
                # session whose counts would never match the restarted readers'.
                _drop_dead(ledger, me.session)
            ledger["sessions"][me.session] = list(me.slots)
            ledger["holders"][f"{me.name}@{visit}"] = self.me
            if not Path(local).exists():
                self._clear_partial(local)
                remote = (*self.parts, name)
                if self.mean_only:
                    fetch_mean_only(self.storage, remote, local)
                else:
                    self.storage.download_file(local, *remote)
        return local

    def release(self, name: str, visit: str) -> None:
        """This reader is done with the visit ``visit`` of ``name``: the last one out on
        the machine deletes the copy."""
        local = self.local_path(name)
        me = self.reader
        with self._locked(local) as ledger:
            ledger["holders"].pop(f"{me.name}@{visit}", None)
            count = ledger["left"].get(me.name, [0, 0, 0])[2]
            ledger["left"][me.name] = [*self.me, count + 1]
            if _finished(ledger):
                Path(local).unlink(missing_ok=True)

    def collect_garbage(self) -> None:
        """Delete the copies here that no live reader holds or is still to read (those of a
        killed run), and the partial downloads they left."""
        if not self.directory.is_dir():
            return
        copies = {str(p) for p in self.directory.glob("[!.]*.safetensors")}
        ledgers = self.directory.glob("*" + LEDGER_SUFFIX)
        copies |= {str(p)[: -len(LEDGER_SUFFIX)] for p in ledgers}
        partial = self.directory.glob(".*.safetensors.*")  # a killed first download's
        copies |= {str(p.with_name(p.name[1:].rsplit(".", 1)[0])) for p in partial}
        for local in sorted(copies):
            with self._locked(local) as ledger:
                for session in list(ledger["sessions"]):
                    if not _session_alive(ledger, session):
                        _drop_dead(ledger, session)
                        del ledger["sessions"][session]
                if Path(local).exists() and _finished(ledger):
                    Path(local).unlink()
                self._clear_partial(local)

    def _clear_partial(self, local: str) -> None:
        """Remove the temp files of a download of ``local`` that died (the lock is held, so
        none is in progress)."""
        for tmp in self.directory.glob(f".{os.path.basename(local)}.*"):
            tmp.unlink(missing_ok=True)


def _drop_dead(ledger: dict, session: str) -> None:
    """Forget the dead processes' entries of ``session``."""
    for table in ("holders", "left"):
        for key, value in list(ledger[table].items()):
            if key.startswith(f"{session}/") and not alive(value):
                del ledger[table][key]


def _session_alive(ledger: dict, session: str) -> bool:
    """Whether any process of ``session`` that touched this copy still runs."""
    return any(
        key.startswith(f"{session}/") and alive(value)
        for table in ("holders", "left")
        for key, value in ledger[table].items()
    )


def _finished(ledger: dict) -> bool:
    """No live holder, and every expected reader of every session has left the last visit
    (or is dead and will not come)."""
    for key, holder in list(ledger["holders"].items()):
        if not alive(holder):
            # A killed reader never releases: it is no holder, and (below) no reader to
            # wait for, even if it died before leaving any visit.
            del ledger["holders"][key]
            reader = key.rsplit("@", 1)[0]
            count = ledger["left"].get(reader, [0, 0, 0])[2]
            if not alive(ledger["left"].get(reader, holder)):
                ledger["left"][reader] = [*holder[:2], count]
    if ledger["holders"]:
        return False
    for session, slots in ledger["sessions"].items():
        left = {key.split("/", 1)[1]: value for key, value in ledger["left"].items()
                if key.startswith(f"{session}/")}  # fmt: skip
        furthest = max((value[2] for value in left.values()), default=0)
        for slot in slots:
            entry = left.get(slot)
            if entry is None or (entry[2] < furthest and alive(entry)):
                return False  # a reader still to come, or a laggard still to arrive
    return True
