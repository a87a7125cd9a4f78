"""The engine on local Ray (CPU, tiny model): data and tensor parallel, aborts, lost workers.

One Ray instance for the module (2 CPUs) and three engines: DP=2 over the compiled-graph step path
with multi-step decoding (num_scheduler_steps 2), and DP=1 x TP=2 over gloo with plain actor calls
and one pass a step. Every greedy output is compared with the in-process engine (cluster.llm.LLM,
one pass a step) on the same checkpoint. The third has no model: its workers model a device's
step queue (queued_worker.py), for when a request arriving mid-step is launched.
"""
import asyncio
import random
import time

import pytest

ray = pytest.importorskip("ray")

from cluster.config import EngineConfig  # noqa: E402
from cluster.launcher import NAMESPACE, launch_engine, worker_actor_name  # noqa: E402
from scheduler.errors import EngineDeadError, InvalidRequestError  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402
from tests.integration.helpers import REPO_ROOT, wait_for  # noqa: E402
from tests.integration.queued_worker import STEP_S, QueuedStepsWorker  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE_ARGS = dict(max_model_len=256, block_size=16, num_gpu_blocks=256, max_num_seqs=64, device="cpu")
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [[100 + 7 * i, 2000 + i, 300, 4000 + 13 * i] * (1 + i % 3) for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy token ids from the in-process engine, keyed by prompt index."""
    from cluster.llm import LLM

    llm = LLM(str(tiny_model_dir), **ENGINE_ARGS)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def dp_engine(tiny_model_dir):
    config = EngineConfig.from_flat(model=str(tiny_model_dir), data_parallel_size=2, use_ray=True,
                                    num_scheduler_steps=2, **ENGINE_ARGS)
    client, shutdown = launch_engine(config, engine_id="dp2", use_compiled_graph=True)
    yield client
    shutdown()


@pytest.fixture(scope="module")
def tp_engine(tiny_model_dir):
    config = EngineConfig.from_flat(model=str(tiny_model_dir), tensor_parallel_size=2, use_ray=True, **ENGINE_ARGS)
    client, shutdown = launch_engine(config, engine_id="tp2", use_compiled_graph=False, max_restarts=1)
    yield client
    shutdown()


@pytest.fixture(scope="module")
def queued_engine(tiny_model_dir):
    """No model: workers whose steps take STEP_S each, queued as on a device (queued_worker.py)."""
    config = EngineConfig.from_flat(model=str(tiny_model_dir), use_ray=True, **ENGINE_ARGS)
    client, shutdown = launch_engine(config, engine_id="queued", use_compiled_graph=True,
                                     worker_cls=QueuedStepsWorker)
    yield client
    shutdown()


async def generate(client, request_id: str, prompt: list[int], params: SamplingParams = GREEDY,
                   on_output=None) -> list[int]:
    tokens = []
    stream = await client.add_request(request_id, prompt, params)
    async for outs in stream:
        for out in outs:
            tokens += out.new_token_ids
        if on_output is not None:
            await on_output(tokens)
    return tokens


async def generate_all(client, prefix: str) -> list[list[int]]:
    return await asyncio.gather(*(generate(client, f"{prefix}-{i}", p) for i, p in enumerate(PROMPTS)))


def test_dp2_greedy_matches_in_process(dp_engine, reference):
    assert asyncio.run(generate_all(dp_engine, "dp")) == reference
    assert dp_engine.uses_link, "the frontend's calls went through Ray, not over the direct link"
    status = asyncio.run(dp_engine.status())
    assert [r.live for r in status.replicas] == [True, True]
    assert status.making_progress and status.any_live
    ray.get(dp_engine.actor.check_no_leaks.remote())


def test_scheduler_actor_freezes_its_start_up_objects(dp_engine):
    """The process that schedules every step keeps its start-up state out of collections
    (workers/gc_freeze.py; the worker processes freeze theirs in WorkerActor.init_kv_cache)."""
    def frozen(core):
        import gc
        return gc.get_freeze_count() > 0, any(o is core for o in gc.get_objects())
    assert ray.get(dp_engine.actor.call_on_step_thread.remote(frozen)) == (True, False)


def test_abort_frees_blocks_on_its_replica(dp_engine):
    async def run():
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        streams = {rid: await dp_engine.add_request(rid, PROMPTS[i], long) for i, rid in enumerate(["ab-a", "ab-b"])}
        for stream in streams.values():
            await stream.__anext__()
        placements = await dp_engine.actor.placements.remote()
        assert placements["ab-a"] != placements["ab-b"], "two requests on an idle DP=2 engine go to both replicas"
        await dp_engine.abort("ab-a")
        rest = [outs async for outs in streams["ab-a"]]
        assert rest and all(o.finish_reason == "abort" for o in rest[-1])

        def usage(core):
            return {r.replica_id: (r.scheduler.block_manager.usage, r.scheduler.has_request("ab-b"))
                    for r in core.replicas}
        after = await dp_engine.actor.call_on_step_thread.remote(usage)
        assert after[placements["ab-a"]] == (0.0, False)  # its replica holds nothing any more
        assert after[placements["ab-b"]][0] > 0 and after[placements["ab-b"]][1]  # the other one runs on
        await dp_engine.abort("ab-b")
        await dp_engine.actor.check_no_leaks.remote()
    asyncio.run(run())


def test_killed_worker_loses_no_request(dp_engine, reference):
    victim = ray.get_actor(worker_actor_name("dp2", 0, 0), namespace=NAMESPACE)
    killed = asyncio.Event()

    async def kill_after_a_few_tokens(tokens):
        if len(tokens) >= 4 and not killed.is_set():
            killed.set()
            ray.kill(victim, no_restart=True)

    async def run():
        return await asyncio.gather(*(
            generate(dp_engine, f"kill-{i}", p, on_output=kill_after_a_few_tokens if i == 0 else None)
            for i, p in enumerate(PROMPTS)))

    t = time.monotonic()
    assert asyncio.run(run()) == reference
    assert killed.is_set() and time.monotonic() - t < 30
    wait_for(lambda: asyncio.run(dp_engine.status()).replicas[0].live, 60, "replica 0 to restart")
    status = asyncio.run(dp_engine.status())
    assert status.replicas[0].worker_restarts == 1 and status.replicas[1].worker_restarts == 0
    assert asyncio.run(generate_all(dp_engine, "after-kill")) == reference  # the new replica serves again
    ray.get(dp_engine.actor.check_no_leaks.remote())


def test_idle_replica_worker_death_is_noticed_and_repaired(dp_engine):
    victim = ray.get_actor(worker_actor_name("dp2", 1, 0), namespace=NAMESPACE)
    before = asyncio.run(dp_engine.status()).replicas[1].worker_restarts
    t = time.monotonic()
    ray.kill(victim, no_restart=True)
    wait_for(lambda: asyncio.run(dp_engine.status()).replicas[1].worker_restarts == before + 1, 30,
             "the idle replica to be noticed dead and restarted")
    assert time.monotonic() - t < 15
    assert asyncio.run(dp_engine.status()).replicas[1].live


def test_sync_core_from_another_client_matches(dp_engine, reference):
    from cluster.ray_engine_core import RayEngineCore

    core = RayEngineCore.connect("dp2")  # by name, as a frontend in another process would
    try:
        tokens = {}
        for i, prompt in enumerate(PROMPTS):
            core.add_request(f"sync-{i}", prompt, GREEDY)
        while core.has_unfinished():
            outputs = core.step()
            assert len({o.req_id for o in outputs}) == len(outputs)  # one step's output per request
            for out in outputs:
                tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
        assert [tokens[f"sync-{i}"] for i in range(len(PROMPTS))] == reference

        # an abort mid-way ends that request with an "abort" output; the batch-mates carry on
        core.add_requests([(f"ab-{i}", prompt, GREEDY, 0, None) for i, prompt in enumerate(PROMPTS[:3])])
        tokens, reasons = {}, {}
        while core.has_unfinished():
            for out in core.step():
                tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
                if out.finished:
                    reasons[out.req_id] = out.finish_reason
                if out.req_id == "ab-1" and "ab-1" not in reasons:
                    core.abort("ab-1")
        assert reasons == {"ab-0": "length", "ab-1": "abort", "ab-2": "length"}
        assert tokens["ab-0"] == reference[0] and tokens["ab-2"] == reference[2]
        assert len(tokens["ab-1"]) < len(reference[1])
    finally:
        core.shutdown()


def test_many_concurrent_requests_with_random_aborts_leak_nothing(dp_engine):
    rng = random.Random(0)

    async def one(i):
        params = SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randint(1, 24), n=1 + (i % 7 == 0))
        prompt = [rng.randrange(10, 150000) for _ in range(rng.randint(1, 40))]
        stream = await dp_engine.add_request(f"many-{i}", prompt, params)
        abort_after = rng.random() * 0.5 if i % 3 == 0 else None
        t = time.monotonic()
        async for _ in stream:
            if abort_after is not None and time.monotonic() - t > abort_after:
                await dp_engine.abort(f"many-{i}")
        return i

    async def run():
        done = await asyncio.gather(*(one(i) for i in range(200)))
        assert sorted(done) == list(range(200))
        assert dp_engine.num_open_streams == 0
        await asyncio.sleep(0.1)  # aborts sent last are applied at the next step boundary
        await dp_engine.actor.check_no_leaks.remote()
        assert await dp_engine.actor.placements.remote() == {}
    asyncio.run(run())


def test_invalid_requests_fail_eagerly(dp_engine):
    async def run():
        with pytest.raises(InvalidRequestError) as e:
            await dp_engine.add_request("bad-1", [1] * 300, GREEDY)
        assert e.value.field == "prompt_token_ids"
        with pytest.raises(InvalidRequestError):
            await dp_engine.add_request("bad-2", [10**9], GREEDY)
        with pytest.raises(InvalidRequestError):
            await dp_engine.add_request("", [5], GREEDY)
    asyncio.run(run())


def test_parallel_sizes_that_cannot_work_fail_at_start(tiny_model_dir):
    config = EngineConfig.from_flat(model=str(tiny_model_dir), tensor_parallel_size=3, use_ray=True, **ENGINE_ARGS)
    with pytest.raises(InvalidRequestError, match="attention heads"):
        launch_engine(config)
    config = EngineConfig.from_flat(model=str(tiny_model_dir), data_parallel_size=2, use_ray=True,
                                    **{**ENGINE_ARGS, "device": "cuda"})
    with pytest.raises(InvalidRequestError, match="no GPU"):
        launch_engine(config)


def test_tp2_over_gloo_matches_tp1(tp_engine, reference):
    assert asyncio.run(generate_all(tp_engine, "tp")) == reference
    names = ray.get(tp_engine.actor.worker_names.remote())
    assert names == [["folovllm-tp2-worker-r0-t0", "folovllm-tp2-worker-r0-t1"]]


def test_requests_wait_while_no_replica_is_live(tp_engine, reference):
    ray.get(tp_engine.actor.set_auto_restart.remote(False))
    ray.kill(ray.get_actor(worker_actor_name("tp2", 0, 1), namespace=NAMESPACE), no_restart=True)
    wait_for(lambda: not asyncio.run(tp_engine.status()).any_live, 10, "the lost TP rank to be noticed")

    async def run():
        task = asyncio.ensure_future(generate(tp_engine, "patient", PROMPTS[1]))
        await asyncio.sleep(1.0)
        status = await tp_engine.status()
        assert not status.any_live and status.num_waiting == 1 and not task.done()
        await tp_engine.actor.set_auto_restart.remote(True)
        return await asyncio.wait_for(task, 60)
    assert asyncio.run(run()) == reference[1]
    assert asyncio.run(tp_engine.status()).replicas[0].worker_restarts == 1


def test_scheduler_actor_restart_ends_streams_then_serves_again(tp_engine, reference):
    async def run():
        client = tp_engine
        stream = await client.add_request("doomed", PROMPTS[0], SamplingParams(temperature=0, max_tokens=200,
                                                                               ignore_eos=True))
        await stream.__anext__()
        ray.kill(client.actor, no_restart=False)  # Ray restarts it (max_restarts=1)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert client.num_open_streams == 0
        deadline = time.monotonic() + 90
        while True:  # calls fail while the actor is down; once it is back, new requests work
            try:
                return await generate(client, "reborn", PROMPTS[0])
            except EngineDeadError:
                assert time.monotonic() < deadline, "the scheduler actor did not come back"
                await asyncio.sleep(0.5)
    assert asyncio.run(run()) == reference[0]
    assert tp_engine.uses_link  # connected again, to the new incarnation's link


def test_offline_llm_with_data_parallel_runs_on_ray(tiny_model_dir, reference):
    from cluster.llm import LLM

    with LLM(str(tiny_model_dir), data_parallel_size=2, **ENGINE_ARGS) as llm:
        assert llm.engine.worker is None, "a data parallel LLM must run its replicas as Ray actors"
        # the prompts go in as one batch, all or none: one too long for the model refuses them all
        with pytest.raises(InvalidRequestError) as e:
            llm.generate(PROMPTS[:3] + [[5] * 300] + PROMPTS[3:], GREEDY, use_tqdm=False)
        assert e.value.field == "prompt_token_ids"
        # the others were aborted before the error reached us (abort waits for the engine's reply)
        assert ray.get(llm.engine.core.client.actor.placements.remote()) == {}
        assert not llm.engine.has_unfinished_requests()
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        text = llm.generate(PROMPTS[0], GREEDY.clone(stop=["zzzz"]), use_tqdm=False)[0].outputs[0]
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert text.token_ids == reference[0] and text.text == llm.tokenizer.decode(reference[0])


def test_a_request_arriving_while_steps_run_joins_the_next_step_launched(queued_engine):
    """Two steps are in flight, one running and one queued behind it. A request that arrives while
    the scheduler waits on the running one is in the next step launched: the scheduler applies it
    before that step is scheduled (EngineCore.step's before_submit), not after, which cost a step."""
    async def run():
        running = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        stream = await queued_engine.add_request("q-running", PROMPTS[0], running)
        tokens = 0
        async for outs in stream:
            tokens += sum(len(o.new_token_ids) for o in outs)
            if tokens >= 2:  # decoding, two steps in flight
                break
        await asyncio.sleep(STEP_S / 5)  # the queued step has been launched; the running one has 0.08 s left
        added_at = time.monotonic()
        late = await queued_engine.add_request("q-late", PROMPTS[1],
                                               SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        assert [o.finish_reason for o in await late.__anext__()] == ["length"]
        await queued_engine.abort("q-running")
        return added_at

    added_at = asyncio.run(run())
    worker = ray.get_actor(worker_actor_name("queued", 0, 0), namespace=NAMESPACE)
    launches = ray.get(worker.launch_log.options(concurrency_group="ctrl").remote())
    late_at = next(t for t, _, new_ids in launches if any(i.startswith("q-late") for i in new_ids))
    assert any(t < added_at for t, _, _ in launches[1:])  # the running request decoded before it came
    assert [step_id for t, step_id, _ in launches if added_at < t < late_at] == []
    ray.get(queued_engine.actor.check_no_leaks.remote())
