"""Extract downloaded archives without letting them write outside their target.

A tar file can name members ``/etc/passwd`` or ``../../x``, or hold links and
device files that redirect later writes. Data archives need none of that, so
only regular files and directories with plain relative names are accepted;
anything else stops extraction with a :class:`~petseg.errors.DataError` that
names the member. Files are written by this module (never by
``TarFile.extract``), so ownership and permission bits in the archive are
ignored too.
"""

from __future__ import annotations

import gzip
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from petseg.errors import DataError


def safe_relative_path(name: str, *, where: str) -> PurePosixPath:
    """Check that a member name or object key stays inside its target directory.

    Args:
        name: the name as stored (``/`` separated); a leading ``./`` is allowed.
        where: the archive or location, for the error message.

    Returns:
        The name as a relative path without ``.`` parts.

    Raises:
        DataError: the name is empty, absolute, or contains ``..``.
    """
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute():
        raise DataError(f"{where}: member {name!r} has an absolute path; expected a path relative to the archive root")
    if ".." in path.parts:
        raise DataError(f"{where}: member {name!r} contains '..'; expected a path inside the archive root")
    parts = [part for part in path.parts if part != "."]
    if not parts:
        raise DataError(f"{where}: member {name!r} has an empty path; expected a file or directory name")
    return PurePosixPath(*parts)


def safe_extract(archive: str | Path, target: str | Path) -> None:
    """Extract a ``.tar``/``.tar.gz`` archive into ``target``.

    Args:
        archive: path of the archive.
        target: directory to extract into (created if missing).

    Raises:
        DataError: the archive cannot be read, or a member is a link, a device,
            a FIFO, has an absolute path or contains ``..``.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                relative = safe_relative_path(member.name, where=str(archive))
                _check_type(member, archive)
                destination = target.joinpath(*relative.parts)
                if member.isdir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: not a readable tar archive ({exc}); "
                        "expected a .tar.gz as in the Oxford-IIIT Pet release") from exc


def _check_type(member: tarfile.TarInfo, archive: str | Path) -> None:
    """Refuse anything but regular files and directories."""
    if member.isfile() or member.isdir():
        return
    if member.issym():
        kind = f"a symbolic link to {member.linkname!r}"
    elif member.islnk():
        kind = f"a hard link to {member.linkname!r}"
    elif member.isdev():
        kind = "a device or FIFO"
    else:
        kind = f"of unsupported tar type {member.type!r}"
    raise DataError(f"{archive}: member {member.name!r} is {kind}; "
                    "archives may hold only regular files and directories")
