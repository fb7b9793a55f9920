"""Saving into an adapter folder so that a kill at any moment leaves the previous or the new adapter, never a mix.

Two files cannot be replaced by one atomic rename, so a save is a redo log:

1. The files are written into a staging folder ``.sparse-delta-save-<id>`` inside the target (same file system) and
   flushed to disk. The saver holds an exclusive ``flock`` on the staging folder for its whole life, so that another
   process can tell a live save from one that was killed (the kernel drops the lock of a dead process).
2. Under an exclusive lock on the target folder, the staging folder is renamed ``.sparse-delta-commit-<id>``: one
   atomic rename decides the save. Its files then replace the old ones (``os.replace``: a weights file of the other
   format first removed, weights before the model card, the config last) and the commit folder is removed.

`recover` brings a folder back to one adapter: it finishes a killed save's commit folder and deletes a killed save's
staging folder (never a live one). Every save runs it first, and so does every load through PEFT
(`SparseDeltaConfig.from_pretrained`), so a kill leaves the previous adapter (killed before step 2) or the new one
(killed during step 2). A loader that never calls our code (transformers' `load_adapter`) reading the folder while a
killed save's commit folder is still there gets a clear `weights_digest` error at first use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

try:
    import fcntl
except ImportError:  # not POSIX: saves are still staged and renamed, without telling live saves from dead ones
    fcntl = None

STAGING, COMMIT = ".sparse-delta-save-", ".sparse-delta-commit-"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@contextlib.contextmanager
def _locked(folder: str):
    """Exclusive lock on a folder, held for the block (serializes commits and recoveries of one target)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _is_dead(path: str) -> bool:
    """Whether nobody holds the staging or commit folder's lock (its saver was killed, or it predates locks)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # already removed by someone else
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _files(root: str) -> list[str]:
    out = []
    for folder, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, n), root) for n in names]
    return out


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply(commit: str, target: str) -> None:
    """Move a decided save's files into place (idempotent: a file already moved is no longer in ``commit``)."""
    files = _files(commit)
    order = sorted(files, key=lambda rel: (os.path.basename(rel) not in _WEIGHTS,
                                           os.path.basename(rel) == "adapter_config.json", rel))
    for rel in order:
        destination = os.path.join(target, rel)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if os.path.basename(rel) in _WEIGHTS:  # a stale file of the other format would be read instead
            for stale in _WEIGHTS:
                other = os.path.join(os.path.dirname(destination), stale)
                if stale != os.path.basename(rel) and os.path.lexists(other):
                    os.remove(other)
        os.replace(os.path.join(commit, rel), destination)
    for folder in {os.path.dirname(os.path.join(target, rel)) for rel in files} | {target}:
        _fsync(folder)
    shutil.rmtree(commit, ignore_errors=True)


def recover(folder: str) -> None:
    """Finish a killed save's commit and remove killed saves' staging folders in ``folder`` and its parent (a
    non-default adapter is saved into a subfolder of the folder that was staged); live saves are left alone."""
    for path in {os.path.abspath(folder), os.path.dirname(os.path.abspath(folder))}:
        try:
            leftovers = [n for n in os.listdir(path) if n.startswith((STAGING, COMMIT))]
        except OSError:
            continue
        if not leftovers:
            continue
        try:
            with _locked(path):
                for name in sorted(os.listdir(path), key=lambda n: not n.startswith(COMMIT)):
                    entry = os.path.join(path, name)
                    if name.startswith(COMMIT) and _is_dead(entry):
                        _apply(entry, path)
                    elif name.startswith(STAGING) and _is_dead(entry):
                        shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # a read-only folder: nothing to repair here; loading reports what it finds
            continue


def save_atomically(folder: str, write) -> None:
    """Run ``write(staging_folder)`` and move what it wrote into ``folder`` as described in the module docstring.
    An exception in ``write`` leaves ``folder`` as it was."""
    os.makedirs(folder, exist_ok=True)
    recover(folder)
    with _locked(folder):  # recovery checks staging folders under this lock: it never sees ours unlocked
        staging = tempfile.mkdtemp(prefix=STAGING, dir=folder)
        fd = os.open(staging, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the save is done: this staging folder is alive
    decided = False
    try:
        write(staging)
        mode = 0o666 & ~_umask()  # what open() gives; safetensors writes its files 0600
        for rel in _files(staging):
            os.chmod(os.path.join(staging, rel), mode)
            _fsync(os.path.join(staging, rel))
        with _locked(folder):
            commit = os.path.join(folder, COMMIT + os.path.basename(staging).removeprefix(STAGING))
            os.rename(staging, commit)
            decided = True
            _fsync(folder)
            _apply(commit, folder)
    finally:
        if not decided:
            shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)
