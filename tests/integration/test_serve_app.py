"""The Ray Serve application on local Ray (CPU, tiny model): Serve's gRPC proxy, handle composition,
config validation, health checks and graceful shutdown.

One Ray instance (2 CPUs) and one Serve instance for the module, configured from ray_config.yaml
with the engine pointed at the tiny checkpoint and the ports picked free (clients use 127.0.0.1;
Serve's gRPC proxy itself always binds every interface). A second application ("caller") composes
with ours through a DeploymentHandle; with two applications, gRPC calls name theirs in metadata.
"""
import asyncio
import pickle
import sys
import threading
import time

import pytest
import yaml

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from ray._common.utils import import_attr  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from cluster.client import Client, FolovllmError, InvalidArgument  # noqa: E402
from cluster.config import EngineConfig, engine_args_from_yaml  # noqa: E402
from cluster.engine_types import EngineStatus, ReplicaStatus  # noqa: E402
from cluster.serve_app import EngineUnhealthyError, LLMServer, build_app, drain  # noqa: E402
from cluster.serve_config import ServeAppArgs, ServeArgsError  # noqa: E402
from protos.folovllm.v1 import llm_pb2 as pb  # noqa: E402
from scheduler.errors import EngineDeadError  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402
from tests.integration.helpers import REPO_ROOT, free_port, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

APP = "folovllm"
PROMPT = "The capital of France is"
GREEDY = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
TINY_ENGINE = dict(device="cpu", max_model_len=256, num_gpu_blocks=128, max_num_seqs=16,
                   max_num_batched_tokens=256)


def serve_config(tiny_model_dir) -> dict:
    """ray_config.yaml as shipped, pointed at the tiny checkpoint with small, fast settings."""
    config = yaml.safe_load((REPO_ROOT / "ray_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    config["grpc_options"]["port"] = free_port()
    args = config["applications"][0]["args"]
    args["engine"].update(model=str(tiny_model_dir), **TINY_ENGINE)
    args.update(health_check_period_s=1, drain_timeout_s=5)
    return config


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Caller:
    """Another application's deployment, calling ours through a DeploymentHandle."""

    def __init__(self, app_name: str):
        self.llm = serve.get_app_handle(app_name)

    async def __call__(self, prompt: str, params: dict) -> tuple[list[str], bool]:
        texts = [d.text async for d in self.llm.options(stream=True).generate.remote(prompt, params)]
        status = await self.llm.status.remote()
        return texts, status.any_live

    async def stream(self, messages: list[dict], params: dict):
        async for delta in self.llm.options(stream=True).chat.remote(messages, params):
            yield delta.text

    async def bad_request(self) -> tuple[list[str], str]:
        try:
            async for _ in self.llm.options(stream=True).generate.remote("", {"max_tokens": 4}):
                pass
        except Exception as e:  # noqa: BLE001 - report what arrived, and as what
            return [c.__name__ for c in type(e).__mro__], str(e)
        return [], ""


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Caller, for replicas that cannot import us
    config = serve_config(tiny_model_dir)
    ServeDeploySchema.model_validate(config)  # still a valid Serve config after our edits
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        serve.start(proxy_location=config["proxy_location"], http_options=config["http_options"],
                    grpc_options=config["grpc_options"])
        app = config["applications"][0]
        builder = import_attr(app["import_path"])
        handle = serve.run(builder(app["args"]), name=app["name"], route_prefix=app["route_prefix"])
        caller = serve.run(Caller.bind(app["name"]), name="caller", route_prefix="/caller")
        yield dict(handle=handle, caller=caller, grpc_target=f"127.0.0.1:{config['grpc_options']['port']}")
    finally:
        serve.shutdown()
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ---- no Ray needed --------------------------------------------------------------------------------

def test_ray_config_yaml_is_read_by_serve_and_cli():
    config = yaml.safe_load((REPO_ROOT / "ray_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert import_attr(app["import_path"]) is build_app
    assert ServeAppArgs.from_args(app["args"]).num_replicas == 1
    engine = EngineConfig.from_flat(engine_args_from_yaml(REPO_ROOT / "ray_config.yaml"))  # folovllm serve --config
    assert engine.model.model == "Qwen/Qwen3-0.6B"
    assert config["grpc_options"]["grpc_servicer_functions"] == ["protos.folovllm.v1.llm_pb2_grpc.add_LLMServiceServicer_to_server"]
    request = pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(max_tokens=3))
    assert pickle.loads(pickle.dumps(request)) == request  # what Serve's proxy does with every request


@pytest.mark.parametrize("args, key, allowed", [
    ({"max_ongoing_request": 8}, "args.max_ongoing_request", "max_ongoing_requests"),
    ({"max_ongoing_requests": 0}, "args.max_ongoing_requests", "greater than or equal to 1"),
    ({"engine": {"max_num_seq": 8}}, "args.engine.max_num_seq", "max_num_seqs"),
    ({"engine": {"policy": "lifo"}}, "args.engine.policy", "'fcfs' or 'priority'"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "args.autoscaling", "must be <= max_replicas"),
    ({"autoscaling": {"max_replica": 2}}, "args.autoscaling.max_replica", "max_replicas"),
    ({"num_replicas": 2, "autoscaling": {"max_replicas": 4}}, "args", "num_replicas or autoscaling"),
])
def test_bad_config_is_rejected_naming_the_key(args, key, allowed):
    with pytest.raises(ServeArgsError) as info:
        build_app(args)
    assert info.value.field == key
    assert str(info.value).startswith(f"{key}: ") and allowed in str(info.value)


def test_deployment_options_reserve_no_gpu():
    options = ServeAppArgs.from_args({"autoscaling": {"min_replicas": 1, "max_replicas": 3},
                                      "max_queued_requests": 100}).deployment_options()
    assert options["ray_actor_options"]["num_gpus"] == 0
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    assert options["max_queued_requests"] == 100


class StubEngine:
    def __init__(self, status=None, error=None):
        self._status, self._error = status, error

    async def status(self):
        if self._error is not None:
            raise self._error
        return self._status


def engine_status(live: bool, making_progress: bool) -> EngineStatus:
    return EngineStatus([ReplicaStatus(0, live, 0, 3, 0.0, 0.0, 0)], num_waiting=3, any_live=live,
                        making_progress=making_progress, num_preemptions=0)


@pytest.mark.parametrize("engine, message", [
    (StubEngine(engine_status(live=False, making_progress=True)), "no engine replica is live"),
    (StubEngine(engine_status(live=True, making_progress=False)), "stalled"),
    (StubEngine(error=EngineDeadError("the engine's scheduler actor died")), "unreachable"),
])
def test_check_health_fails_when_engine_dead_or_stalled(engine, message):
    class Unstarted(LLMServer.func_or_class):  # the deployment's class, without an engine
        def __del__(self):
            pass  # Serve awaits the real (async) one at shutdown; garbage collection would not

    server = object.__new__(Unstarted)
    server._engine = engine
    with pytest.raises(EngineUnhealthyError, match=message):
        asyncio.run(server.check_health())
    server._engine = StubEngine(engine_status(live=True, making_progress=True))
    assert asyncio.run(server.check_health()) is None


class OpenStreams:
    """The part of LLMServicer that drain() uses, with one stream that ends only when aborted."""

    def __init__(self, idle: bool):
        self.draining, self.aborted, self.num_in_flight = False, False, 0 if idle else 1
        self._idle = asyncio.Event()
        if idle:
            self._idle.set()

    async def wait_idle(self):
        await self._idle.wait()

    async def abort_all(self):
        self.aborted = True
        self._idle.set()


def test_drain_waits_for_open_streams_then_aborts_them():
    idle, busy = OpenStreams(idle=True), OpenStreams(idle=False)
    asyncio.run(drain(idle, 5.0))
    assert idle.draining and not idle.aborted
    started = time.monotonic()
    asyncio.run(drain(busy, 0.2))
    assert busy.draining and busy.aborted and time.monotonic() - started < 2


# ---- on Serve -------------------------------------------------------------------------------------

def test_grpc_proxy_streams_what_a_whole_call_returns(cluster):
    with Client(cluster["grpc_target"], metadata=[("application", APP)], timeout=60) as client:
        deltas = list(client.generate_stream(PROMPT, SamplingParams(**GREEDY)))
        whole = client.generate(PROMPT, SamplingParams(**GREEDY))
        info, _ = client.model_info()
        with pytest.raises(InvalidArgument, match="prompt"):
            client.generate("", SamplingParams(**GREEDY))
        status = client.status()
    assert len(deltas) > 1 and deltas[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in deltas) == GREEDY["max_tokens"]
    assert "".join(d.text for d in deltas) == whole.text and whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.outputs[0].token_ids
    assert info.vocab_size == 151936 and status.any_live and not status.draining
    with Client(cluster["grpc_target"], timeout=30) as client:  # two applications: the proxy needs the name
        with pytest.raises(FolovllmError, match="NOT_FOUND"):
            client.model_info()


def test_other_deployment_streams_through_a_handle(cluster):
    texts, any_live = cluster["caller"].remote(PROMPT, GREEDY).result(timeout_s=60)
    with Client(cluster["grpc_target"], metadata=[("application", APP)], timeout=60) as client:
        expected = client.generate(PROMPT, SamplingParams(**GREEDY)).text
        chat_expected = client.chat([{"role": "user", "content": "Hi"}], SamplingParams(**GREEDY)).text
    assert len(texts) > 1 and "".join(texts) == expected and any_live
    chat = list(cluster["caller"].options(stream=True).stream.remote([{"role": "user", "content": "Hi"}], GREEDY))
    assert len(chat) > 1 and "".join(chat) == chat_expected
    mro, message = cluster["caller"].bad_request.remote().result(timeout_s=60)
    assert "InvalidRequestError" in mro and "prompt" in message
    assert cluster["handle"].check_health.remote().result(timeout_s=30) is None


def held_engine_groups() -> set[str]:
    """Ids of the placement groups our app's engines hold."""
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items()
            if (pg["name"] or "").startswith(f"folovllm-serve-{APP}-") and pg["state"] != "REMOVED"}


def test_dead_engine_fails_health_and_serve_replaces_the_replica(cluster):
    from cluster.launcher import NAMESPACE

    def schedulers() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == NAMESPACE and a["name"].startswith(f"folovllm-serve-{APP}-")
                and a["name"].endswith("-scheduler")]

    def generate() -> str | None:
        try:
            with Client(cluster["grpc_target"], metadata=[("application", APP)], timeout=10) as client:
                return client.generate(PROMPT, SamplingParams(**GREEDY)).text
        except FolovllmError:  # UNAVAILABLE from the dead engine's replica, while it is being replaced
            return None

    # what a replica killed outright leaves behind: its engine's group, named as launcher.py names them
    orphan = ray.util.placement_group([{"CPU": 0.01}], name=f"folovllm-serve-{APP}-gone1234-r0")
    ray.get(orphan.ready(), timeout=30)
    expected, [old], old_groups = generate(), schedulers(), held_engine_groups()
    ray.kill(ray.get_actor(old, namespace=NAMESPACE), no_restart=True)  # the engine dies; the replica lives on
    new = wait_for(lambda: [n for n in schedulers() if n != old], 120, "a new replica's engine")
    assert wait_for(generate, 60, "the new replica to serve") == expected
    assert len(new) == 1 and old not in schedulers()
    # the old replica's __del__ released its engine's groups; the new one's __init__ swept the orphan
    wait_for(lambda: not old_groups & held_engine_groups(), 30, "the dead engine's placement groups to go")
    assert orphan.id.hex() not in held_engine_groups()


def test_delete_drains_open_streams_then_stops_the_engine(cluster):
    """serve.delete while a stream is open: it runs to its end, then the engine's placement groups go."""
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    first, deltas, errors = threading.Event(), [], []

    def stream():
        try:
            with Client(cluster["grpc_target"], metadata=[("application", APP)], timeout=120) as client:
                for delta in client.generate_stream(PROMPT, long):
                    deltas.append(delta)
                    first.set()
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)
            first.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first.wait(60)
    assert held_engine_groups()
    serve.delete(APP)  # returns once the replica has shut down: Serve's drain, then our __del__
    thread.join(120)
    assert not errors and deltas[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in deltas) == 200
    assert not held_engine_groups()  # released by __del__ itself, not left for a later sweep
