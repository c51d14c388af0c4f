"""The run directory, the one thing a run leaves behind: ``runs/NAME/`` with ``config.json``,
``env.json``, ``metrics.jsonl``, ``summary.json``, ``tokenizer/`` and ``checkpoints/``.

It is written so that no fault leaves it lost or inconsistent: every JSON file is replaced
atomically, a lock keeps two processes from training into it at once, temporary files of a killed
process are removed at the next start, and a resumed run first cuts ``metrics.jsonl`` back to the
step it resumes from, so each step appears once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from train.errors import UserError

# Errors of the file system the user can fix: reported as one line naming the path.
USER_OS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def describe_os_error(e: OSError, what: str, path: str | os.PathLike, hint: str = "") -> UserError:
    """A one-line UserError for a file-system failure the user can act on."""
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(
        e.errno, e.strerror or str(e)
    )
    return UserError(f"cannot write {what} {path}: {reason}{'; ' + hint if hint else ''}")


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` via a temporary file in the same directory and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunDir:
    def __init__(self, path: str | os.PathLike, is_main: bool = True):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.is_main = is_main
        self._lock = None

    def has_history(self) -> bool:
        """True when a run already trained here (metrics or checkpoints on disk)."""
        return (self.path / "metrics.jsonl").exists() or any(self.checkpoints.glob("step_*.pt"))

    def prepare(self, fresh: bool) -> None:
        """Create the directory, lock it for this process and remove what killed runs left.

        ``fresh`` (``--resume never``) refuses a directory that holds another run's history: its
        checkpoints and metrics are never touched by a run that did not resume them."""
        if not self.is_main:
            return
        if fresh and self.has_history():
            raise UserError(
                f"{self.path} already holds a run (metrics or checkpoints) and --resume never would "
                "overwrite it: pass a new --run-name, or remove that directory yourself"
            )
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".lock", "w")
        except OSError as e:
            raise describe_os_error(
                e, "run directory", self.path, "choose another with --out-dir / --run-name"
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{self.path} is in use by another training process (its .lock is held)") from None
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of writes a killed process never finished (ours only)."""
        stale = [
            *self.checkpoints.glob("step_*.pt.*.tmp"),
            *self.path.glob("*.json.tmp"),
            *self.path.glob("*.jsonl.tmp"),
        ]
        stale += [p for p in self.path.glob("tokenizer.*.tmp") if p.is_dir()]
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return stale

    @property
    def locked(self) -> bool:
        """True once ``prepare`` has taken the directory (main rank)."""
        return self._lock is not None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- files ----------------------------------------------------------------------------------

    def write_json(self, name: str, obj) -> None:
        try:
            write_atomic(self.path / name, json.dumps(obj, indent=2, default=str))
        except OSError as e:
            if e.errno in USER_OS_ERRNOS:
                raise describe_os_error(e, "run file", self.path / name) from None
            raise

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def open_metrics(self, resumed_step: int):
        """``metrics.jsonl`` for appending, holding only the rows up to ``resumed_step``: rows a
        killed process logged after its last checkpoint are replayed by the resumed run, and a row
        cut off mid-write is dropped."""
        path = self.path / "metrics.jsonl"
        kept = []
        if resumed_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resumed_step:
                    kept.append(line)
        write_atomic(path, "".join(line + "\n" for line in kept))
        return open(path, "a")

    def copy_tokenizer(self, src: str | os.PathLike | None) -> Path | None:
        """The run's own copy of its tokenizer (``tokenizer/``), so the directory is self-contained."""
        if src is None or not Path(src).is_dir():
            return None
        dest = self.path / "tokenizer"
        if Path(src).resolve() == dest.resolve() or _same_files(Path(src), dest):
            return dest
        tmp = self.path / f"tokenizer.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dest.exists():  # moved aside, then swapped: a kill in between leaves a whole copy
            old = self.path / f"tokenizer.{os.getpid()}.old.tmp"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
        return dest


def _same_files(a: Path, b: Path) -> bool:
    """True when directories a and b hold the same files with the same bytes."""
    if not b.is_dir():
        return False
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    if names != sorted(p.name for p in b.iterdir() if p.is_file()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
