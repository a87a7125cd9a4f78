"""EngineClient against a fake SchedulerActor (no Ray cluster): batching, routing, endings, failures,
each through Ray's calls and through the direct link (cluster/engine_link.py) on loopback."""
import asyncio
import threading
import types
from collections import deque

import pytest

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError  # noqa: E402

from cluster import engine_link  # noqa: E402
from cluster.engine_client import EngineClient  # noqa: E402
from cluster.engine_types import ModelInfo  # noqa: E402
from scheduler.errors import EngineDeadError, InvalidRequestError, QueueFullError  # noqa: E402
from scheduler.output import EngineCoreOutput, pack_outputs  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402

INFO = ModelInfo("fake", 128, 1000, [2])


class _LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()


ACTOR_LOOP = _LoopThread()  # the fake actor's link servers run here, apart from the clients' loops


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeActor:
    """The SchedulerActor's submit / get_outputs protocol, with steps pushed by the test; with
    link=True it offers them over a LinkServer too, as the real actor does."""

    link = False  # set per test by the `link` fixture
    instances: list = []

    def __init__(self):
        self.incarnation = "one"
        self.batches: list[list[tuple]] = []
        self.replies: dict[str, object] = {}  # request id -> error reply for its add
        self.steps: deque = deque()
        self.step_no = 0
        self.dead = False
        self.ray_calls = 0  # submit and get_outputs calls that came through "Ray"
        self.submit = _Method(self._through_ray(self._submit))
        self.get_outputs = _Method(self._through_ray(self._get_outputs))
        self.link_address = _Method(self._link_address)
        self.server: engine_link.LinkServer | None = None
        FakeActor.instances.append(self)

    def _through_ray(self, method):
        def call(*args):
            self.ray_calls += 1
            return method(*args)
        return call

    async def _link_address(self):
        if self.dead:
            raise ActorDiedError()
        if not self.link:
            return None
        if self.server is None:  # on the actor's own loop, as in the real actor's process
            self.server = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._start_server(),
                                                                                     ACTOR_LOOP.loop))
        return self.server.host, self.server.port, self.server.token

    async def _start_server(self):
        # what the link serves: the methods themselves, not Ray's handles
        server = engine_link.LinkServer(types.SimpleNamespace(submit=self._submit, get_outputs=self._get_outputs),
                                        "127.0.0.1")
        await server.start()
        return server

    def drop_connections(self) -> None:
        """The link server goes away with every connection (its next address is a new one)."""
        if self.server is not None:
            ACTOR_LOOP.loop.call_soon_threadsafe(self.server.close)
            self.server = None

    def push(self, *outputs: EngineCoreOutput) -> None:
        self.step_no += 1
        self.steps.append((self.step_no, pack_outputs(list(outputs))))

    def die(self) -> None:
        self.dead = True
        self.drop_connections()  # the process is gone, and its connections with it

    def restart(self) -> None:
        self.dead, self.incarnation, self.steps, self.step_no = False, "two", deque(), 0

    async def _submit(self, frontend_id, ops):
        if self.dead:
            raise ActorDiedError()
        self.batches.append(ops)
        return self.incarnation, [self.replies.get(op[1]) if op[0] == "add" else None for op in ops]

    async def _get_outputs(self, frontend_id, incarnation, after, timeout_s):
        while True:
            if self.dead:
                raise ActorDiedError()
            if incarnation == self.incarnation:
                while self.steps and self.steps[0][0] <= after:
                    self.steps.popleft()
            if self.steps:
                return self.incarnation, list(self.steps)
            await asyncio.sleep(0.002)


@pytest.fixture(autouse=True, params=[False, True], ids=["ray", "link"])
def link(request, monkeypatch):
    """Every test runs with the actor's calls through Ray, then over the link."""
    monkeypatch.setattr(FakeActor, "link", request.param)
    monkeypatch.setattr(FakeActor, "instances", [])
    yield request.param
    if request.param:
        assert sum(a.ray_calls for a in FakeActor.instances) == 0, "a call went through Ray beside the link"


def out(req_id, index=0, tokens=(5,), finish=None):
    return EngineCoreOutput(req_id, index, list(tokens), finish_reason=finish)


async def drain(stream):
    return [[(o.index, o.new_token_ids, o.finish_reason) for o in outs] async for outs in stream]


def test_concurrent_adds_go_in_one_call_and_outputs_are_split_per_step():
    async def run():
        actor = FakeActor()
        client = EngineClient(actor, INFO)
        a, b = await asyncio.gather(client.add_request("a", [1], SamplingParams(n=2)),
                                    client.add_request("b", [1], SamplingParams()))
        assert [[op[:2] for op in batch] for batch in actor.batches] == [[("add", "a"), ("add", "b")]]
        actor.push(out("a", 0), out("b", 0), out("a", 1))
        actor.push(out("a", 0, finish="length"), out("b", 0, finish="stop"))
        actor.push(out("a", 1, (6,), "length"))
        assert await drain(a) == [[(0, [5], None), (1, [5], None)], [(0, [5], "length")], [(1, [6], "length")]]
        assert await drain(b) == [[(0, [5], None)], [(0, [5], "stop")]]
        assert client.num_open_streams == 0
    asyncio.run(run())


def test_a_sink_gets_each_poll_of_its_requests_in_one_call():
    async def run():
        actor = FakeActor()
        client = EngineClient(actor, INFO)
        calls = []
        sink = calls.append
        other = await client.add_request("c", [1], SamplingParams())  # a stream beside the sink
        await asyncio.gather(client.add_request_to_sink("a", [1], SamplingParams(), 0, sink),
                             client.add_request_to_sink("b", [1], SamplingParams(), 0, sink))
        actor.push(out("a"), out("c"), out("b", finish="length"))
        assert await other.__anext__() == [out("c")]  # the step has been dispatched
        await client.abort("a")
        assert [[(r, None if i is None else [(o.new_token_ids, o.finish_reason) for o in i]) for r, i in c]
                for c in calls] == [
            [("a", [([5], None)]), ("b", [([5], "length")]), ("b", None)],  # one call for the step
            [("a", [([], "abort")])], [("a", None)]]
        assert client.num_open_streams == 1
    asyncio.run(run())


def test_validation_errors_raise_from_add_request():
    async def run():
        actor = FakeActor()
        actor.replies = {"bad": ("invalid", "prompt_token_ids", "must not be empty"),
                         "full": ("queue_full", "9 waiting")}
        client = EngineClient(actor, INFO)
        with pytest.raises(InvalidRequestError) as e:
            await client.add_request("bad", [], SamplingParams())
        assert e.value.field == "prompt_token_ids"
        with pytest.raises(QueueFullError):
            await client.add_request("full", [1], SamplingParams())
        assert client.num_open_streams == 0
    asyncio.run(run())


def test_abort_ends_the_stream_at_once_and_finish_ends_a_sibling():
    async def run():
        actor = FakeActor()
        client = EngineClient(actor, INFO)
        a = await client.add_request("a", [1], SamplingParams())
        b = await client.add_request("b", [1], SamplingParams(n=2))
        actor.push(out("a"), out("b", 0), out("b", 1))
        assert len(await a.__anext__()) == len(await b.__anext__()) - 1 == 1
        await client.abort("a")
        assert await drain(a) == [[(0, [], "abort")]]
        await client.finish("b", 0, "STOP")
        actor.push(out("b", 0), out("b", 1, finish="length"))  # sibling 0's late token is dropped
        assert await drain(b) == [[(1, [5], "length")]]
        assert [op for batch in actor.batches for op in batch if op[0] != "add"] == [
            ("abort", "a"), ("finish", "b", 0, "STOP")]
    asyncio.run(run())


def test_a_reply_lost_with_its_event_loop_is_sent_again():
    actor = FakeActor()
    client = EngineClient(actor, INFO)

    async def first():
        stream = await client.add_request("a", [1], SamplingParams(max_tokens=3))
        actor.push(out("a"))
        return (await stream.__anext__())[0].new_token_ids

    assert asyncio.run(first()) == [5]  # its loop closes with the next poll in flight

    async def second():
        stream = await client.add_request("b", [1], SamplingParams())
        actor.push(out("b", tokens=(7,)))
        actor.push(out("b", tokens=(8,), finish="stop"))
        return await drain(stream)

    assert asyncio.run(second()) == [[(0, [7], None)], [(0, [8], "stop")]]
    assert ("abort", "a") in [op for batch in actor.batches for op in batch]  # the orphan is freed


def test_actor_death_ends_streams_with_engine_dead_and_restart_serves_again():
    async def run():
        actor = FakeActor()
        client = EngineClient(actor, INFO)
        a = await client.add_request("a", [1], SamplingParams())
        actor.push(out("a"))
        await a.__anext__()
        actor.die()
        with pytest.raises(EngineDeadError):
            await a.__anext__()
        with pytest.raises(EngineDeadError):
            await client.add_request("b", [1], SamplingParams())
        actor.restart()
        b = await client.add_request("b", [1], SamplingParams())
        actor.push(out("b", finish="stop"))
        assert await drain(b) == [[(0, [5], "stop")]]
        client.close()
    asyncio.run(run())


@pytest.mark.parametrize("link", [True], indirect=True)
@pytest.mark.parametrize("failure", ["nothing listens", "the actor cannot tell", "the token is refused"])
def test_a_link_that_cannot_open_falls_back_to_ray(link, failure):
    async def run():
        actor = FakeActor()
        closed = engine_link.LinkServer(None, "127.0.0.1")
        await closed.start()
        closed.close()  # nothing listens on its port any more

        real = actor.link_address.fn

        async def address():
            if failure == "the actor cannot tell":  # the method fails (a RayTaskError), the actor lives
                raise RuntimeError("cannot listen")
            if failure == "the token is refused":  # a server that listens and closes on the token
                host, port, token = await real()
                return host, port, bytes(len(token))
            return closed.host, closed.port, closed.token
        actor.link_address = _Method(address)
        client = EngineClient(actor, INFO)
        a = await client.add_request("a", [1], SamplingParams())
        actor.push(out("a", finish="stop"))
        assert await drain(a) == [[(0, [5], "stop")]]
        assert actor.ray_calls >= 2 and not client.uses_link  # the submit and a poll went through Ray
        FakeActor.instances.remove(actor)  # its Ray calls are the point here
    asyncio.run(run())


@pytest.mark.parametrize("link", [True], indirect=True)
def test_a_broken_link_reconnects_and_loses_no_step(link):
    async def run():
        actor = FakeActor()
        client = EngineClient(actor, INFO)
        a = await client.add_request("a", [1], SamplingParams())
        actor.push(out("a"))
        assert (await a.__anext__())[0].new_token_ids == [5]
        first_port = actor.server.port
        actor.drop_connections()  # the actor lives on
        actor.push(out("a", tokens=(6,)))
        actor.push(out("a", tokens=(7,), finish="stop"))
        assert await drain(a) == [[(0, [6], None)], [(0, [7], "stop")]]
        assert actor.server is not None and actor.server.port != first_port  # connected anew
        client.close()
    asyncio.run(run())
