"""A frontend's direct connection to the SchedulerActor: its submit and get_outputs without Ray's hop.

A Ray call from a frontend process to the scheduler actor's event loop took 1.1-1.5 ms each way
on an H200 host (s22-call4), two of them on every request's way to its first token (the submit,
then the poll's reply), against ~4 ms for the prompt's prefill itself. Over a TCP connection into
the actor's event loop the same two calls are a socket write and read each.

The link carries exactly the actor's two frontend methods, with the same arguments and replies, so
EngineClient's semantics (batching, acknowledged steps, incarnations) are those of the Ray path:
    frontend -> actor: (seq, method, args)     method in LINK_METHODS
    actor -> frontend: (seq, ok, reply)        reply is the method's return value, or its error text
Each frame is a 4-byte big-endian length and a pickle. The connection opens with the actor's
random token, which a frontend gets from the actor over Ray (link_address()): nothing is unpickled
from a peer that has not shown it, so the link trusts no one Ray would not. The actor answers a
good token with one byte (ACK), so a frontend knows at connect whether the link works.

A frontend that cannot connect (another node behind a firewall, FOLOVLLM_ENGINE_LINK=0) keeps
calling the actor through Ray. A link that breaks fails its calls with EngineLinkError; the
frontend's next call connects again, asking Ray for the address, so an actor that died shows up
as it does on the Ray path (RayActorError).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import pickle
import secrets
import struct

logger = logging.getLogger(__name__)

LINK_METHODS = ("submit", "get_outputs")
TOKEN_BYTES = 32
ACK = b"\x01"
CONNECT_TIMEOUT_S = 2.0
_LENGTH = struct.Struct("!I")


class EngineLinkError(ConnectionError):
    """The link to the scheduler actor broke (or never opened): its calls' replies are lost."""


def link_enabled() -> bool:
    return os.environ.get("FOLOVLLM_ENGINE_LINK", "1").lower() not in ("0", "false", "no", "off")


def _frame(obj) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader):
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


class LinkServer:
    """Actor side: serves LINK_METHODS of `target` (the SchedulerActor) on its event loop."""

    def __init__(self, target, host: str):
        self.target = target
        self.host = host
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()  # the open connections

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening and drop every connection (their frontends' calls fail, and they reconnect)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        calls: set[asyncio.Task] = set()
        self._writers.add(writer)
        try:
            if not hmac.compare_digest(await reader.readexactly(TOKEN_BYTES), self.token):
                return
            writer.write(ACK)
            while True:
                seq, method, args = await _read_frame(reader)
                task = asyncio.create_task(self._call(writer, seq, method, args))
                calls.add(task)
                task.add_done_callback(calls.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the frontend went away: its requests are aborted once it stops polling
        except Exception:  # noqa: BLE001 - a frame that does not unpickle or unpack: drop the connection
            logger.warning("engine link: a malformed frame; closing the connection", exc_info=True)
        finally:
            for task in calls:  # a long poll would otherwise wait out its timeout for nobody
                task.cancel()
            self._writers.discard(writer)
            writer.close()

    async def _call(self, writer: asyncio.StreamWriter, seq: int, method: str, args: tuple) -> None:
        try:
            if method not in LINK_METHODS:
                raise ValueError(f"unknown link method {method!r}; allowed: {', '.join(LINK_METHODS)}")
            reply = (seq, True, await getattr(self.target, method)(*args))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the caller's call fails, not the connection
            reply = (seq, False, f"{type(e).__name__}: {e}")
        try:
            writer.write(_frame(reply))
            await writer.drain()
        except ConnectionError:
            pass  # gone: a poll's steps stay until acknowledged, so a later poll gets them


class EngineLink:
    """Frontend side: call(method, *args) over one connection, many calls in flight."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._calls: dict[int, asyncio.Future] = {}
        self._next_seq = 0
        self._error: EngineLinkError | None = None
        self._reading = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, host: str, port: int, token: bytes) -> "EngineLink":
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as e:
            raise EngineLinkError(f"cannot connect to the engine at {host}:{port}: {e!r}") from None
        writer.write(token)
        try:  # a refused token, or a middlebox that resets the connection, shows here and not mid-call
            if await asyncio.wait_for(reader.readexactly(len(ACK)), CONNECT_TIMEOUT_S) != ACK:
                raise ConnectionError("no link acknowledgement")
        except (OSError, EOFError, asyncio.TimeoutError) as e:
            writer.close()
            raise EngineLinkError(f"the engine at {host}:{port} did not accept the link: {e!r}") from None
        return cls(reader, writer)

    @property
    def broken(self) -> bool:
        return self._error is not None

    async def call(self, method: str, *args, timeout: float | None = None):
        """The actor's reply to method(*args). Past timeout seconds without it the link counts as
        broken (a peer gone without closing the connection, its node lost), and every call on it
        fails, so that the caller asks Ray about the actor."""
        if self._error is not None:
            raise self._error
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        future = asyncio.get_running_loop().create_future()
        self._calls[seq] = future
        try:
            self._writer.write(_frame((seq, method, args)))
            await self._writer.drain()
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self._fail(EngineLinkError(f"no reply to {method} in {timeout:g} s"))
            raise self._error from None
        except ConnectionError as e:
            self._fail(EngineLinkError(f"the link to the engine broke: {e!r}"))
            raise self._error from None
        finally:
            self._calls.pop(seq, None)

    def close(self) -> None:
        self._fail(EngineLinkError("the link to the engine was closed"))

    async def _read(self) -> None:
        try:
            while True:
                seq, ok, reply = await _read_frame(self._reader)
                future = self._calls.get(seq)
                if future is None or future.done():
                    continue  # its caller left (cancelled)
                if ok:
                    future.set_result(reply)
                else:  # as a Ray task's error: the call failed, the engine did not die
                    future.set_exception(RuntimeError(f"the engine failed the call: {reply}"))
        except asyncio.CancelledError:
            # the event loop is shutting down (close() fails the link itself): leave the
            # connection open, so that what is sent meanwhile (an abort of a stream closed with
            # the loop) still reaches the actor, as a Ray call would
            raise
        except Exception as e:  # noqa: BLE001 - closed, reset, or a frame that does not unpickle
            self._fail(EngineLinkError(f"the link to the engine broke: {e!r}"))

    def _fail(self, error: EngineLinkError) -> None:
        if self._error is None:
            self._error = error
        for future in self._calls.values():
            if not future.done():
                future.set_exception(self._error)
        self._calls.clear()
        with contextlib.suppress(RuntimeError):  # closed after its event loop: nothing left to stop
            if not self._reading.done() and self._reading is not asyncio.current_task():
                self._reading.cancel()
            self._writer.close()
