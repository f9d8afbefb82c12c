"""FileStorage: a regular file (or block device) through os.pread/os.pwrite/fdatasync,
with QEMU-compatible OFD byte-range locks on bytes 100+i / 200+i."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import CorruptionError, ImageStateError, LockError

_F_OFD_GETLK = 36
_F_OFD_SETLK = 37
_FLOCK = struct.Struct("@hhqqi4x")
_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_SYNC_FILE_RANGE_WRITE = 2

PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
PERM_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 1, 2, 4, 8
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
_MAX_FILE_OFFSET = (1 << 63) - 1
_MAX_BYTES_PAST_EOF = 64 << 20  # zeros a read may return past the end of the file
_WRITE_PIECE = 2 << 20


_libc: object | None = None


def _c_library() -> object:
    import ctypes

    global _libc
    if _libc is None:
        # the C library already loaded into this process: no find_library() subprocesses
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    fallocate = _c_library().fallocate  # type: ignore[attr-defined]
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileStorage:
    def __init__(
        self,
        path: str,
        writable: bool = False,
        *,
        lock: bool = True,
        force_share: bool = False,
        create: bool = False,
    ) -> None:
        self.name = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT  # truncated only once the lock is ours (never under a VM)
        self.fd = os.open(path, flags, 0o644)
        self._punch_ok = True
        self._extend_ok = True
        self._writeback_ok = True
        self.durable = True
        try:
            if lock:
                self._lock(force_share)
            if create:
                os.ftruncate(self.fd, 0)
        except BaseException:
            os.close(self.fd)
            raise

    # ---- locking as QEMU's file-posix does it ---------------------------------------
    def _setlk(self, byte: int) -> None:
        fcntl.fcntl(self.fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))

    def _held_by_other(self, byte: int) -> bool:
        res = fcntl.fcntl(
            self.fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        )
        return int(_FLOCK.unpack(res)[0]) != fcntl.F_UNLCK

    def _lock(self, force_share: bool) -> None:
        if self.writable:
            held = PERM_READ | PERM_WRITE | PERM_RESIZE
            unshared = PERM_WRITE | PERM_RESIZE
        elif force_share:
            held, unshared = PERM_READ, 0
        else:
            held, unshared = PERM_READ, PERM_WRITE | PERM_RESIZE
        try:
            for i in range(4):
                if held >> i & 1:
                    self._setlk(LOCK_PERM_BASE + i)
                if unshared >> i & 1:
                    self._setlk(LOCK_SHARED_BASE + i)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return  # no OFD locks here (e.g. some network file systems): go on unlocked
            raise self._lock_error(True, 1) from None
        for i in range(4):
            if held >> i & 1 and self._held_by_other(LOCK_SHARED_BASE + i):
                raise self._lock_error(False, i)
            if unshared >> i & 1 and self._held_by_other(LOCK_PERM_BASE + i):
                raise self._lock_error(True, i)

    def _lock_error(self, shared: bool, perm: int) -> LockError:
        kind = "shared " if shared else ""
        return LockError(
            f'Could not open \'{self.name}\': Failed to get {kind}"{PERM_NAMES[perm]}" lock\n'
            f"Is another process using the image [{self.name}]?"
        )

    # ---- I/O ------------------------------------------------------------------------
    def _check_write(self) -> None:
        if not self.writable:
            raise ImageStateError(f"{self.name} is opened read-only")

    def pread(self, offset: int, length: int) -> bytes:
        """Read; bytes past the end of the file read as zeros. A request that reaches far
        past the end (metadata of a hostile image) is refused before any buffer is made."""
        if offset < 0 or length < 0 or offset + length > _MAX_FILE_OFFSET:
            raise CorruptionError(
                f"{self.name}: read of {length} bytes at offset {offset:#x} lies outside any file"
            )
        if length > _MAX_BYTES_PAST_EOF and offset + length > self.size() + _MAX_BYTES_PAST_EOF:
            raise CorruptionError(
                f"{self.name}: read of {length} bytes at offset {offset:#x} reaches far past "
                f"the end of the file ({self.size()} bytes)"
            )
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        out = b"".join(parts)
        return out + b"\0" * (length - len(out))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_write()
        view = memoryview(data)
        if self._extend_ok and len(view) and offset + len(view) > self.size():
            self._extend(offset, len(view))
        while len(view):
            # pieces of at most 2 MiB: one buffered write of 8 MiB measured about twice
            # the kernel time of four 2 MiB ones (convert, 1 GiB, ext4)
            n = os.pwrite(self.fd, view[:_WRITE_PIECE], offset)
            view = view[n:]
            offset += n

    def _extend(self, offset: int, length: int) -> None:
        """Allocate the blocks of a write that extends the file just before writing it:
        ext4 then skips its delayed-allocation work page by page (measured: about a third
        less kernel time per appended byte). Only an optimisation: any failure is left for
        the write itself to report."""
        try:
            _fallocate(self.fd, 0, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                self._extend_ok = False

    def flush(self) -> None:
        # durable=False is qemu-img's cache=unsafe: for a scratch output nobody relies on
        # until the whole job succeeded, ordering barriers buy nothing
        if self.writable and self.durable:
            os.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        self._check_write()
        os.ftruncate(self.fd, size)

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def start_writeback(self) -> None:
        """Ask the kernel to start writing this file's dirty pages back now, without waiting
        (sync_file_range with SYNC_FILE_RANGE_WRITE), so that a later flush has less left to
        wait for. Promises nothing about durability; only an optimisation, so any failure
        (no such call here) is ignored."""
        if not self.writable or not self._writeback_ok:
            return
        import ctypes

        try:
            call = _c_library().sync_file_range  # type: ignore[attr-defined]
            call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            call(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        except (AttributeError, OSError):
            self._writeback_ok = False

    def punch_hole(self, offset: int, length: int) -> None:
        self._check_write()
        if not self._punch_ok or length <= 0:
            return
        try:
            _fallocate(self.fd, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._punch_ok = False  # punching is only an optimisation
            else:
                raise

    def allocate(self, offset: int, length: int) -> None:
        self._check_write()
        try:
            _fallocate(self.fd, 0, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if offset + length > self.size():
                os.ftruncate(self.fd, offset + length)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def event(self, name: str) -> None:
        pass
