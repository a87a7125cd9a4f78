"""The engine link on loopback (no Ray): token check, method whitelist, concurrent calls, timeouts."""
import asyncio

import pytest

from cluster.engine_link import ACK, TOKEN_BYTES, EngineLink, EngineLinkError, LinkServer


class Target:
    """The two methods a LinkServer serves, recording their calls."""

    def __init__(self):
        self.calls = []
        self.release = asyncio.Event()

    async def submit(self, frontend_id, ops):
        self.calls.append(("submit", frontend_id, ops))
        return "inc", [None] * len(ops)

    async def get_outputs(self, frontend_id, incarnation, after, timeout_s):
        self.calls.append(("get_outputs", frontend_id, after))
        await asyncio.wait_for(self.release.wait(), timeout_s)
        return "inc", [(after + 1, b"packed")]

    async def shutdown(self):  # an actor method the link must not expose
        self.calls.append(("shutdown",))


async def _served():
    target = Target()
    server = LinkServer(target, "127.0.0.1")
    await server.start()
    return target, server


async def _linked():
    """A served Target and a link to it with the right token."""
    target, server = await _served()
    return target, server, await EngineLink.connect(server.host, server.port, server.token)


def test_calls_in_flight_get_their_own_replies():
    async def run():
        target, server, link = await _linked()
        poll = asyncio.ensure_future(link.call("get_outputs", "fe", "inc", 3, 5.0))
        assert await link.call("submit", "fe", [("add", "a")]) == ("inc", [None])  # past the waiting poll
        assert not poll.done()
        target.release.set()
        assert await poll == ("inc", [(4, b"packed")])
        link.close()
        server.close()
    asyncio.run(run())


def test_only_the_frontend_methods_are_served():
    async def run():
        target, server, link = await _linked()
        with pytest.raises(RuntimeError, match="unknown link method 'shutdown'; allowed: submit, get_outputs"):
            await link.call("shutdown")
        assert await link.call("submit", "fe", []) == ("inc", [])  # the link goes on
        assert target.calls == [("submit", "fe", [])]
        link.close()
        server.close()
    asyncio.run(run())


def test_a_wrong_token_is_refused_at_connect_before_anything_is_read():
    async def run():
        target, server = await _served()
        with pytest.raises(EngineLinkError, match="did not accept the link"):
            await EngineLink.connect(server.host, server.port, b"x" * TOKEN_BYTES)
        reader, writer = await asyncio.open_connection(server.host, server.port)  # a frame after a bad token
        writer.write(b"x" * TOKEN_BYTES + (5).to_bytes(4, "big") + b"junk!")
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # no acknowledgement, hung up
        assert target.calls == []
        server.close()
    asyncio.run(run())


def test_a_call_unanswered_past_its_timeout_breaks_the_link():
    async def run():
        target, server, link = await _linked()
        other = asyncio.ensure_future(link.call("get_outputs", "fe", "inc", 0, 30.0))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineLinkError, match="no reply to get_outputs in 0.1 s"):
            await link.call("get_outputs", "fe", "inc", 0, 30.0, timeout=0.1)
        with pytest.raises(EngineLinkError):  # every call on the link fails with it
            await other
        assert link.broken
        server.close()
    asyncio.run(run())


def test_a_closed_server_fails_the_calls_waiting_on_it():
    async def run():
        target, server, link = await _linked()
        poll = asyncio.ensure_future(link.call("get_outputs", "fe", "inc", 0, 30.0))
        await asyncio.sleep(0.05)
        server.close()  # the actor's process is gone
        with pytest.raises(EngineLinkError, match="broke"):
            await poll
    asyncio.run(run())


def test_a_malformed_frame_drops_its_connection_only():
    async def run():
        target, server, good = await _linked()
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(server.token + (5).to_bytes(4, "big") + b"junk!")  # authenticated, not a pickle
        assert await asyncio.wait_for(reader.read(), 5.0) == ACK  # accepted, then hung up on
        assert await good.call("submit", "fe", []) == ("inc", [])
        good.close()
        server.close()
    asyncio.run(run())
