"""Atomic writes: the one implementation every writer in paca uses.

Two tools:

* :func:`write_file` (and :func:`write_text`, :func:`write_json`) writes **one file**: into
  a temporary name next to it, flushed to disk, then renamed over the target, so a reader
  sees the old file or the new one, never half of one.
* :func:`publish` writes **several files that belong together** (an adapter's weights and
  its config) as one *generation*, and :func:`read_unit` reads one generation back::

      folder/
        paca_config.json          -> .paca/current/paca_config.json        (symlinks)
        paca_adapter.safetensors  -> .paca/current/paca_adapter.safetensors
        .paca/current             -> g-<id>                                 (the commit point)
        .paca/g-<id>/             the files of the committed generation
        .paca/lock                serializes commits into this folder

  A save writes every file into a fresh ``.paca/tmp-<id>/``, fsyncs the files and the
  directory, then, holding ``.paca/lock``, renames the directory to ``g-<id>`` and swaps the
  ``current`` symlink with one ``os.replace``: **the single commit point**. The names at the
  top of the folder are fixed symlinks through ``current``, so they all switch from the old
  generation to the new one at the same instant. Before the commit nothing the folder
  shows has changed; after it, all of the new files are there. Then the superseded
  generation is deleted.

Why this design. The folder cannot itself be swapped: it may exist already and hold other
files (a Trainer checkpoint, a run folder). A manifest file naming a generation would leave
the documented names stale or missing, so tools that open ``folder/<name>`` (PEFT,
safetensors, ``cat``) would read something else than paca does; with symlinks through one
pointer they read exactly what paca reads. Only one rename commits, so no ordering of two
replacements can leave a mix.

* **Kill at any moment** (SIGKILL, power loss after the fsyncs): before the rename of
  ``current`` the previous generation is intact; after it, the new one is complete.
  Leftovers of a killed save (``tmp-*`` directories, a superseded ``g-*``) are deleted by
  the next save.
* **Concurrent writers** each write their own ``tmp-*``; commits are serialized by the lock,
  so the last commit wins and the folder never points at a deleted or partial generation.
  A writer holds an ``flock`` on ``tmp-<id>/.writing`` while it writes; the kernel drops it
  when the process dies (also on SIGKILL), so cleanup deletes a ``tmp-*`` only when its
  writer is gone, never a concurrent writer's work in progress. Where the filesystem has no
  ``flock`` (some network filesystems), cleanup only deletes leftovers older than an hour.
* **Readers** resolve every name first and retry when the names point into two generations
  or a file disappears under them (a commit happened meanwhile), so they read one
  generation.
* **Permissions**: files get the process umask's permissions (0644 under ``umask 022``, also
  where a writer such as safetensors creates 0600 files), directories too (0755).
* **Existing folders** whose files are regular files (written by an older paca, or copied
  with a tool that dereferences symlinks) are first moved into a generation of their own,
  in steps that each keep the old adapter readable, then the new one is committed.
* **No symlinks** (FAT/exFAT, some network shares, Windows without developer mode): the
  files are replaced one at a time, each atomically, with a warning; an interrupted save can
  then leave files of two saves, which the adapter's loader detects and reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("paca")

#: writes one file at the path it is given.
Writer = Callable[[Path], None]
T = TypeVar("T")

CURRENT = "current"
LOCK = "lock"
WRITING = ".writing"
#: age after which a leftover is deleted where flock is unavailable (no way to tell
#: a live writer's files from a dead one's).
STALE_AFTER_S = 3600.0
#: a single-file temp must be at least this old (and unlocked) to be deleted as stale.
_TEMP_GRACE_S = 2.0
_READ_ATTEMPTS = 50


def _token() -> str:
    return f"{time.time_ns():x}-{os.getpid()}-{secrets.token_hex(4)}"


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - not Linux
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def _finish(path: Path) -> None:
    """Give a written file the umask's permissions (some writers, safetensors among
    them, create 0600 files) and flush it to disk."""
    os.chmod(path, 0o666 & ~_umask())
    fsync_file(path)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (renames, new files) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _flock(fd: int, *, blocking: bool) -> bool | None:
    """Lock ``fd`` exclusively: True if locked, False if another holder has it (only when
    not ``blocking``), None where the filesystem or OS has no flock."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP, EBADF on filesystems without flock
        return None
    return True


def _holder_gone(path: Path) -> bool | None:
    """Whether the process that locked ``path`` is gone: True (lock free), False (held),
    None (cannot tell: missing file or no flock)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        return _flock(fd, blocking=False)
    finally:
        os.close(fd)  # closing drops a lock just taken


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ----------------------------------------------------------------------- one file
def write_file(path: str | os.PathLike[str], write: Writer) -> Path:
    """``write(tmp)`` into a temporary name next to ``path``, fsync, rename over ``path``.

    Readers see the old file or the new one. On any exception (including a full disk)
    the temporary file is removed and ``path`` is unchanged. The file gets the umask's
    permissions. Temporaries left by a killed writer are deleted by the next write.
    """
    path = Path(path)
    _clean_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{_token()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _flock(fd, blocking=False)  # tells cleanup in other processes that we are alive
        write(tmp)
        _finish(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`write_file` with ``data`` as the content."""
    return write_file(path, lambda p: p.write_bytes(data))


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """:func:`write_file` with ``text`` as the content."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike[str], data: Any, **dumps: Any) -> Path:
    """:func:`write_text` of ``json.dumps(data, **dumps)`` plus a final newline."""
    return write_text(path, json.dumps(data, **dumps) + "\n")


def _clean_stale_temps(path: Path) -> None:
    prefix, suffix = f".{path.name}.", ".tmp"
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if not (entry.name.startswith(prefix) and entry.name.endswith(suffix)):
                continue
            tmp = Path(entry.path)
            age = _age_s(tmp)
            gone = _holder_gone(tmp)
            if (gone is True and age > _TEMP_GRACE_S) or (gone is None and age > STALE_AFTER_S):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


# ----------------------------------------------------------------------- a unit of files
@contextlib.contextmanager
def _store_lock(store: Path) -> Iterator[bool]:
    """Hold ``store/lock``; yields whether it is really locked (False: no flock here)."""
    fd = os.open(store / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        yield _flock(fd, blocking=True) is True
    finally:
        os.close(fd)


def _symlinks_work(store: Path) -> bool:
    """Whether symlinks can be made in ``store`` (probed each save: it costs one link)."""
    probe = store / f".probe-{_token()}"
    try:
        os.symlink(CURRENT, probe)
    except (OSError, NotImplementedError):
        return False
    with contextlib.suppress(FileNotFoundError):
        probe.unlink()
    return True


def _link_target(store: str, name: str) -> str:
    return os.path.join(store, CURRENT, name)


def _is_our_link(directory: Path, store: str, name: str) -> bool:
    p = directory / name
    return p.is_symlink() and os.readlink(p) == _link_target(store, name)


class Found(NamedTuple):
    """Where a name of a unit is read from: ``shown`` as the user knows it, ``real`` the
    file it resolves to now."""

    shown: Path
    real: Path


def view(
    directory: str | os.PathLike[str],
    names: Sequence[str],
    *,
    store: str,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Found | None]:
    """For each name, the file a reader reads now: ``directory/name`` (symlinks followed),
    else ``directory/<alias>`` (an older name), else the committed generation's copy (a
    save killed before it linked the name). None where there is none."""
    directory = Path(directory)
    out: dict[str, Found | None] = {}
    for name in names:
        found = None
        candidates = [directory / name]
        if aliases and name in aliases:
            candidates.append(directory / aliases[name])
        candidates.append(directory / store / CURRENT / name)
        for i, c in enumerate(candidates):
            if c.is_file():
                shown = candidates[0] if i == len(candidates) - 1 else c
                found = Found(shown, Path(os.path.realpath(c)))
                break
        out[name] = found
    return out


def read_unit(
    directory: str | os.PathLike[str],
    names: Sequence[str],
    read: Callable[[dict[str, Found | None]], T],
    *,
    store: str,
    aliases: Mapping[str, str] | None = None,
) -> T:
    """``read(view(...))`` on files of one generation, retried while a concurrent save
    changes the folder under it (an error from ``read`` is raised when the folder did not
    change, so it is about the files themselves)."""
    directory = Path(directory)
    store_real = Path(os.path.realpath(directory / store))
    for attempt in range(_READ_ATTEMPTS):
        found = view(directory, names, store=store, aliases=aliases)
        gens = {f.real.parent for f in found.values() if f and f.real.parent.parent == store_real}
        if len(gens) <= 1:
            try:
                return read(found)
            except Exception:
                if view(directory, names, store=store, aliases=aliases) == found:
                    raise
        time.sleep(0.002 * (attempt + 1))
    raise RuntimeError(
        f"{str(directory)!r} kept changing while it was read (another process is saving into "
        f"it); read it again when that save is done"
    )


def publish(
    directory: str | os.PathLike[str],
    writers: Mapping[str, Writer],
    *,
    store: str,
    aliases: Mapping[str, str] | None = None,
) -> Path:
    """Write the files ``{name: writer}`` into ``directory`` as one unit; returns it.

    ``writer(path)`` writes one file at ``path``. ``store`` is the hidden sub-directory
    that holds the generations (see the module docstring). ``aliases`` (``{name: older
    name}``) are older names of a file: read as the file where ``name`` is absent, and
    deleted once ``name`` is published. On any exception before the commit (a writer
    failing, a full disk) the folder is unchanged and the new files are removed.
    """
    directory = Path(directory)
    names = list(writers)
    aliases = dict(aliases or {})
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{str(directory)!r} is a file, not a folder; save elsewhere")
    directory.mkdir(parents=True, exist_ok=True)
    for name in [*names, *aliases.values()]:
        p = directory / name
        if p.is_dir() and not p.is_symlink():
            raise IsADirectoryError(f"{str(p)!r} is a directory; remove it or save elsewhere")
    store_dir = directory / store
    if store_dir.is_symlink() or (store_dir.exists() and not store_dir.is_dir()):
        raise FileExistsError(f"{str(store_dir)!r} is not a directory; remove it and save again")
    store_dir.mkdir(exist_ok=True)
    token = _token()
    tmp: Path | None = store_dir / f"tmp-{token}"
    with _store_lock(store_dir):  # create and mark it alive before any cleanup can see it
        if not _symlinks_work(store_dir):
            tmp = None
        else:
            os.mkdir(tmp)
            guard = os.open(tmp / WRITING, os.O_RDWR | os.O_CREAT, 0o666)
            _flock(guard, blocking=False)
    if tmp is None:
        return _publish_one_by_one(directory, writers, store_dir, aliases)
    gen: Path | None = None
    committed = False
    try:
        for name, write in writers.items():
            write(tmp / name)
            _finish(tmp / name)
        fsync_dir(tmp)
        with _store_lock(store_dir) as locked:
            _adopt_existing(directory, store, names, aliases)
            os.unlink(tmp / WRITING)
            gen = store_dir / f"g-{token}"
            os.rename(tmp, gen)
            tmp = None
            _point(store_dir, gen.name)  # the commit point
            committed = True
            try:
                _link_names(directory, store, names)
                _drop_aliases(directory, aliases)
                fsync_dir(directory)
                _cleanup(directory, store_dir, names, locked)
            except Exception as exc:  # committed: the new files are readable already
                logger.warning("saved %s, but tidying the folder failed: %s", directory, exc)
    except BaseException:
        if not committed:
            for leftover in (tmp, gen):
                if leftover is not None:
                    shutil.rmtree(leftover, ignore_errors=True)
        raise
    finally:
        os.close(guard)
    return directory


def _point(store_dir: Path, gen_name: str) -> None:
    """Make ``store_dir/current`` name ``gen_name``, in one rename."""
    current = store_dir / CURRENT
    if os.path.lexists(current) and not current.is_symlink():
        os.rename(current, store_dir / f"stale-{_token()}")  # e.g. a copy that followed links
    _swap_link(store_dir / f"{CURRENT}.{_token()}.lnk", gen_name, current)
    fsync_dir(store_dir)


def _swap_link(link: Path, target: str, dest: Path) -> None:
    """Make ``dest`` a symlink to ``target`` in one rename (via ``link``)."""
    os.symlink(target, link)
    try:
        os.replace(link, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        raise


def _link_names(directory: Path, store: str, names: Sequence[str]) -> None:
    for name in names:
        if _is_our_link(directory, store, name):
            continue
        link = directory / f".{name}.{_token()}.lnk"
        _swap_link(link, _link_target(store, name), directory / name)


def _drop_aliases(directory: Path, aliases: Mapping[str, str]) -> None:
    for alias in aliases.values():
        with contextlib.suppress(FileNotFoundError):
            (directory / alias).unlink()


def _adopt_existing(
    directory: Path, store: str, names: Sequence[str], aliases: Mapping[str, str]
) -> None:
    """Move files that are not yet our symlinks (an older layout, a copy) into a
    generation of their own, without changing what the folder reads as."""
    foreign = [
        n for n in names if os.path.lexists(directory / n) and not _is_our_link(directory, store, n)
    ]
    aliased = [
        n
        for n, a in aliases.items()
        if not os.path.lexists(directory / n) and os.path.lexists(directory / a)
    ]
    if not foreign and not aliased:
        return
    store_dir = directory / store
    found = view(directory, names, store=store, aliases=aliases)
    adopt = store_dir / f"tmp-{_token()}"
    os.mkdir(adopt)
    try:
        for name, f in found.items():
            if f is not None:
                try:
                    os.link(f.real, adopt / name)
                except OSError:  # no hard links here
                    shutil.copyfile(f.real, adopt / name)
                    fsync_file(adopt / name)
        fsync_dir(adopt)
        gen = store_dir / f"g-{_token()}"
        os.rename(adopt, gen)
    except BaseException:
        shutil.rmtree(adopt, ignore_errors=True)
        raise
    _point(store_dir, gen.name)  # same content as the files it replaces
    _link_names(directory, store, names)
    _drop_aliases(directory, aliases)
    fsync_dir(directory)


def _cleanup(directory: Path, store_dir: Path, names: Sequence[str], locked: bool) -> None:
    """Delete what earlier saves left behind (called holding the store lock)."""
    current = store_dir / CURRENT
    keep = os.readlink(current) if current.is_symlink() else None
    for entry in os.scandir(store_dir):
        name, path = entry.name, Path(entry.path)
        if name in (CURRENT, LOCK) or name == keep:
            continue
        if name.startswith("tmp-"):
            guard = path / WRITING
            if guard.exists():  # a writer holds its flock while it writes
                gone = _holder_gone(guard)
                if gone is None:  # no flock here
                    gone = _age_s(path) > STALE_AFTER_S
            else:  # guards are removed, and adoptions made, only under the lock
                gone = locked or _age_s(path) > STALE_AFTER_S
            if not gone:
                continue
        elif not name.startswith(("g-", "stale-", ".probe-")) and not name.endswith(".lnk"):
            continue  # not ours: leave it
        elif not locked and _age_s(path) <= STALE_AFTER_S:
            continue
        _remove(path)
    for entry in os.scandir(directory):  # symlinks made under the lock, never renamed
        if entry.name.endswith(".lnk") and any(entry.name.startswith(f".{n}.") for n in names):
            _remove(Path(entry.path))


def _publish_one_by_one(
    directory: Path, writers: Mapping[str, Writer], store_dir: Path, aliases: Mapping[str, str]
) -> Path:
    logger.warning(
        "%s does not support symbolic links: its files are replaced one at a time (each "
        "atomically), so an interrupted save can leave files of two saves",
        directory,
    )
    with _store_lock(store_dir):
        for name, write in writers.items():
            write_file(directory / name, write)
        _drop_aliases(directory, aliases)
    return directory
