"""The node operations shared by a plain connection and a transaction; each subclass says how to send."""

from __future__ import annotations

import contextlib

from xenblk.xenstore import wire
from xenblk.xenstore.errors import InvalidArgument, NoEntry, ProtocolError, TooBig
from xenblk.xenstore.perms import Perm


class NodeOps:
    async def _call(self, op: wire.Op, payload: bytes, path: str | None) -> bytes:
        """Send one request; return the reply payload or raise the mapped XenStoreError."""
        raise NotImplementedError

    async def read_bytes(self, path: str) -> bytes:
        return await self._call(wire.Op.READ, wire.path_arg(path), path)

    async def read(self, path: str) -> str:
        raw = await self.read_bytes(path)
        try:
            return raw.decode()
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"xenstore read {path}: value is not valid UTF-8", path=path) from e

    async def try_read(self, path: str) -> str | None:
        try:
            return await self.read(path)
        except NoEntry:
            return None

    async def write(self, path: str, value: str | bytes) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        await self._call(wire.Op.WRITE, wire.path_arg(path) + raw, path)

    async def mkdir(self, path: str) -> None:
        await self._call(wire.Op.MKDIR, wire.path_arg(path), path)

    async def rm(self, path: str) -> None:
        with contextlib.suppress(NoEntry):
            await self._call(wire.Op.RM, wire.path_arg(path), path)

    async def directory(self, path: str) -> list[str]:
        try:
            return wire.split_strings(await self._call(wire.Op.DIRECTORY, wire.path_arg(path), path), "directory")
        except TooBig:
            # The child list does not fit one reply: fetch it in parts (xenstored >= 4.9).
            return await self._directory_parts(path)

    async def _directory_parts(self, path: str) -> list[str]:
        # Each part is "<generation>\0" + whole NUL-terminated names; the last part has one more NUL.
        for _attempt in range(8):
            children: list[str] = []
            generation: bytes | None = None
            offset = 0
            while True:
                reply = await self._call(wire.Op.DIRECTORY_PART, wire.path_arg(path) + wire.strings(str(offset)), path)
                gen, sep, chunk = reply.partition(b"\0")
                last = chunk == b"\0" or chunk.endswith(b"\0\0")
                names = chunk[:-1] if last else chunk
                if not sep or (not last and not names.endswith(b"\0")):
                    raise ProtocolError(f"xenstore directory {path}: malformed partial directory reply", path=path)
                if generation is not None and gen != generation:
                    break  # the node changed between parts: start over
                generation = gen
                children += wire.split_strings(names, "directory")
                if last:
                    return children
                offset += len(names)
        raise ProtocolError(f"xenstore directory {path}: child list kept changing while being read", path=path)

    async def get_perms(self, path: str) -> list[Perm]:
        parts = wire.split_strings(await self._call(wire.Op.GET_PERMS, wire.path_arg(path), path), "permissions")
        try:
            perms = [Perm.parse(p) for p in parts]
        except InvalidArgument as e:
            raise ProtocolError(f"xenstore get_perms {path}: {e}", path=path) from e
        if not perms:
            raise ProtocolError(f"xenstore get_perms {path}: empty permission list", path=path)
        return perms

    async def set_perms(self, path: str, perms: list[Perm]) -> None:
        if not perms:
            raise InvalidArgument(f"xenstore set_perms {path}: needs at least the owner entry", path=path)
        await self._call(wire.Op.SET_PERMS, wire.path_arg(path) + wire.strings(*map(str, perms)), path)
