"""Checks of the paths a command reads and writes, made before any work starts, each failing in one line.

An output is never a device, FIFO or socket (a save renames a finished file over its path, which would replace a
device node), never an existing directory where a file is expected or the reverse, and its directory must exist and
be writable. An input that exists is reported as what it is when it is not what the command reads (a FIFO, a
device, a file where a directory is expected); an input that does not exist is reported as missing, unless it may be
a Hub id.
"""

from __future__ import annotations

import os
import re
import stat

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# names that are files, never Hub repositories
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".safetensors", ".bin", ".pt", ".yaml", ".yml", ".txt")


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` can be a Hub repository id (``name`` or ``owner/name``), not a local path or a file name."""
    return bool(_HUB_ID.match(text)) and not text.endswith(_FILE_SUFFIXES)


def kind(path: str | os.PathLike) -> str | None:
    """What is at ``path``, in words ("a directory", "a regular file", "a FIFO", "a character device", ...), or None
    if nothing is. Symbolic links are followed; a dangling one is "a broken symbolic link"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else None
    except (NotADirectoryError, OSError):  # a component is a file, or the name is too long
        return None
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "a special file"


def check_input(path: str | os.PathLike, what: str, file: bool = True, directory: bool = False,
                hub: bool = False) -> None:
    """Refuse ``path`` unless it is a regular file (``file``), a directory (``directory``) or, when nothing exists
    there, possibly a Hub id (``hub``). ``what`` names the input in the message (e.g. "mask file")."""
    text = os.fspath(path)
    found = kind(text)
    if found == "a regular file" and file or found == "a directory" and directory:
        return
    wanted = " or ".join(w for w, ok in (("a file", file), ("a directory", directory), ("a Hub id", hub)) if ok)
    if found is not None:
        raise ValueError(f"{what} {text} is {found}, not {wanted}")
    if hub and looks_like_hub_id(text):
        return
    raise FileNotFoundError(f"{what} {text} does not exist" + (" (neither a local path nor a Hub id)" if hub else ""))


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """Refuse to write the file ``path`` unless it is new or an existing regular file, in a writable directory,
    with a name the file system accepts. ``-`` (standard output) passes."""
    text = os.fspath(path)
    if text == "-":
        return
    found = kind(text)
    if found == "a directory":
        raise IsADirectoryError(f"{what} {text} is a directory; name a file to write (in it, or elsewhere)")
    if found not in (None, "a regular file"):
        raise ValueError(f"{what} {text} is {found}, not a regular file; it is never written over: name a file")
    if found == "a regular file" and not os.access(text, os.W_OK):
        raise PermissionError(f"{what} {text} is not writable; name another file or change its permissions")
    parent = os.path.dirname(os.path.abspath(text))
    if kind(parent) != "a directory":
        raise FileNotFoundError(f"{what} {text}: the directory {parent} does not exist; create it first")
    _check_new_name(text, what)


def check_output_dir(path: str | os.PathLike, what: str) -> None:
    """Refuse to write into the directory ``path`` unless it is an existing writable directory, or can be created
    (its nearest existing parent a writable directory, each new name short enough)."""
    text = os.fspath(path)
    found = kind(text)
    if found == "a directory":
        if not os.access(text, os.W_OK | os.X_OK):
            raise PermissionError(f"{what} {text} is a directory that is not writable; name another directory")
        return
    if found is not None:
        raise ValueError(f"{what} {text} is {found}, not a directory; name a new or existing directory to write into")
    _check_new_name(text, what)


def _check_new_name(text: str, what: str) -> None:
    """The nearest existing parent of ``text`` is a writable directory and every name to create fits its limit."""
    absolute = os.path.abspath(text)
    parent, new = absolute, []
    while True:
        parent, name = os.path.split(parent)
        new.append(name)
        if kind(parent) is not None or parent == os.path.dirname(parent):
            break
    found = kind(parent)
    if found != "a directory":
        raise NotADirectoryError(f"{what} {text}: {parent} is {found or 'missing'}, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {text}: the directory {parent} is not writable; choose a path you can write")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for name in new:
        if len(os.fsencode(name)) > limit:
            raise ValueError(f"{what}: the name {name[:40]}... is {len(os.fsencode(name))} bytes, longer than the "
                             f"{limit} this file system allows; choose a shorter name")
