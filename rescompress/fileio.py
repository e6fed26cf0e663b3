"""Safe output handling: write to a temporary file beside the target, then rename; never overwrite an input.

Every stage that writes a file goes through :func:`atomic_path`, so an interrupted or failed run leaves
either the old file or no file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from rescompress.errors import RescompressError, UsageError


def ensure_not_input(output: Path | str, inputs: Iterable[Path | str | None]) -> None:
    """Refuse an output path that is one of the inputs (same file after resolving links), or a data file
    (image, .npz, IDX) inside an input folder, existing or not: it would change the data set."""
    out = Path(output).resolve()
    for inp in inputs:
        if inp is None:
            continue
        p = Path(inp)
        if p.resolve() == out or (p.exists() and out.exists() and os.path.samefile(p, out)):
            raise RescompressError(f"output {output} is the same file as input {inp}; choose another path")
        if p.is_dir() and out.is_relative_to(p.resolve()) and _is_data_file(out):
            raise RescompressError(f"output {output} is a data file in the input folder {inp}; choose another path")


def _is_data_file(path: Path) -> bool:
    from rescompress.data import IMAGE_EXTENSIONS

    name = path.name.lower()
    return name.endswith(IMAGE_EXTENSIONS) or name.endswith(".npz") or "-ubyte" in name


def require_suffix(output: Path | str, suffix: str, what: str) -> None:
    """Refuse an output whose name says another format than the one written (``what`` names it): the other
    commands, and users, tell a file's format by its name."""
    name = Path(output).name
    if not name.lower().endswith(suffix) or len(name) == len(suffix):
        raise UsageError(f"this command writes {what}: name the output *{suffix}, not {name or str(output)}")


def _existing_folder(target: Path) -> Path:
    """The folder that will hold ``target`` or its new sub-folders; refuses a target that is a folder or
    lies under a file."""
    if target.is_dir():
        raise RescompressError(f"cannot write {target}: it is a folder")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise RescompressError(f"cannot write {target}: {folder} is a file, not a folder")
    return folder


def check_writable(target: Path | str) -> None:
    """Refuse, before any work is done, an output that cannot be written: a folder, a path under a file, a
    folder without write permission. Creates nothing that stays (one probe file, removed at once)."""
    target = Path(target)
    folder = _existing_folder(target)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it over ``target``.

    On any exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    _existing_folder(target)  # the temporary file below is the write probe: no second one
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=suffix if suffix is not None else target.suffix + ".tmp",
            dir=target.parent,
        )
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, target)
        except OSError as exc:  # e.g. the target became a folder meanwhile
            raise _cannot_write(target, exc) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _cannot_write(target: Path, exc: OSError) -> RescompressError:
    """The error for an output that cannot be written: it names the file asked for, not the temporary one."""
    return RescompressError(f"cannot write {target}: {exc.strerror or exc}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: Path | str, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def file_sha256(path: Path | str, limit: int | None = None) -> str:
    """Hex SHA-256 of a file (of its first ``limit`` bytes if given)."""
    h = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while True:
            n = 1 << 20 if remaining is None else min(1 << 20, remaining)
            if n == 0:
                break
            chunk = f.read(n)
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()


COMMITTED: list[Path] = []  # output folders whose staged files have landed in this process (for messages)
STAGING_PREFIX = ".rescompress-staging-"


class StagedOutputs:
    """The files of one multi-file run, written into a hidden staging folder inside ``out`` and moved into
    ``out`` together by :meth:`commit`.

    Until the commit, ``out`` is untouched: a run that fails or is interrupted removes only its staging
    folder (and the folders it created for ``out``, when they are left empty), never a file it did not
    write; a re-run into a folder of earlier outputs leaves that set whole, not half replaced. The commit is
    one rename per file, so a mixed set needs an interrupt within those few renames.
    """

    def __init__(self, out: Path | str) -> None:
        self.out = Path(out)
        self.created: list[Path] = []  # folders this run made for ``out``, outermost first
        self.stage: Path | None = None
        self.names: list[str] = []

    def __enter__(self) -> StagedOutputs:
        if self.out.exists() and not self.out.is_dir():
            raise RescompressError(f"the output folder {self.out} exists and is not a folder; choose another -o")
        missing = []
        folder = self.out
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        if not folder.is_dir():
            raise RescompressError(f"cannot write into {self.out}: {folder} is a file, not a folder")
        try:
            for d in reversed(missing):
                try:
                    d.mkdir()
                except FileExistsError:  # "new/.." exists once "new" does
                    if not d.is_dir():
                        raise
                    continue
                self.created.append(d)
            self.stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out))
        except OSError as exc:
            self._remove_created()
            raise RescompressError(f"cannot write into {self.out}: {exc.strerror or exc}") from None
        return self

    @property
    def folder(self) -> Path:
        """The staging folder (files written here land in ``out`` at :meth:`commit`)."""
        if self.stage is None:
            raise RescompressError("internal error: the staged outputs are not open")
        return self.stage

    def path(self, final: Path | str) -> Path:
        """Where to write the output that will be ``final`` (a file directly in ``out``)."""
        final = Path(final)
        if self.stage is None or final.parent.resolve() != self.out.resolve():
            raise RescompressError(f"internal error: {final} is not an output of {self.out}")
        if final.name not in self.names:
            self.names.append(final.name)
        return self.stage / final.name

    def commit(self) -> None:
        assert self.stage is not None
        names = self.names + sorted(p.name for p in self.stage.iterdir() if p.name not in self.names)
        names = [n for n in names if (self.stage / n).is_file()]
        for name in names:  # every target is checked before the first file moves: none, or the whole set
            if (self.out / name).is_dir():
                raise RescompressError(f"cannot write {self.out / name}: it is a folder")
        for name in names:  # (anything written beside a staged file, e.g. external data, goes too)
            try:
                os.replace(self.stage / name, self.out / name)
            except OSError as exc:
                raise _cannot_write(self.out / name, exc) from None
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage = None
        if not self.out.name.startswith(STAGING_PREFIX):  # (a nested run's files have not landed yet)
            COMMITTED.append(self.out)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.stage is not None:  # not committed: a failure or an interrupt
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
            self._remove_created()

    def _remove_created(self) -> None:
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty: another run may have written there meanwhile
