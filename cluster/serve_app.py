"""The Ray Serve application: a deployment whose every replica owns one engine.

    serve run ray_config.yaml                     # import_path: cluster.serve_app:build_app
    llm = serve.get_app_handle("folovllm")        # or a DeploymentHandle bound into another app
    async for delta in llm.options(stream=True).generate.remote("Hello", {"max_tokens": 32}):
        print(delta.text, end="")

Each replica (LLMServer) starts its engine with launch_engine: a SchedulerActor, and per engine
replica tensor_parallel_size WorkerActors in a STRICT_PACK placement group. Callers reach it two ways:
- Serve's gRPC proxy, serving folovllm.v1.LLMService (grpc_options.grpc_servicer_functions): the
  proxy calls the method of the same name (Generate, Chat, ...) with the request message;
- a DeploymentHandle, from other Serve applications: generate / chat (streams of RequestDelta),
  status, model_info, abort.
Both run the request through cluster/grpc_server.py's LLMServicer (validation, tokenizing, chat
template, detokenizing, error mapping), adapted by _CallContext: the servicer writes messages, Serve
wants them yielded.

GPUs: the replica actor reserves no GPU (ray_actor_options num_gpus=0) and never touches CUDA; it
tokenizes and relays. The GPUs go to the WorkerActors through the engine's own placement groups. A
GPU reserved by the replica would be one those groups could never get (on a node of one GPU the
engine could not start at all), and Serve's own placement_group_bundles are not used: the engine's
groups are created by its SchedulerActor, which is pinned (soft) to the replica's node.

Lifetime: the replica owns its SchedulerActor, which owns the workers, so when Serve replaces or
kills a replica, Ray takes its engine down with it. check_health fails when the engine is dead or
stalled, so Serve replaces the replica; __del__ drains open streams, then stops the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import ray
from ray import serve
from ray.serve import Application

from cluster import grpc_convert as conv
from cluster.engine_types import EngineClientProtocol, EngineStatus, ModelInfo
from cluster.grpc_config import GrpcServerOptions
from cluster.grpc_server import LLMServicer, RequestDeadlineError, ServerDrainingError
from cluster.metrics import ServerMetrics
from cluster.output_processor import RequestDelta
from cluster.serve_config import PicklableInvalidRequestError, ServeAppArgs
from protos.folovllm.v1 import llm_pb2 as pb
from scheduler.errors import EngineDeadError, InvalidRequestError, QueueFullError
from scheduler.sampling_params import SamplingParams

logger = logging.getLogger("ray.serve")

HEALTH_STATUS_TIMEOUT_S = 10.0  # an engine slower than this to report its status is unhealthy
ABORT_GRACE_S = 5.0  # after a drain aborts streams: time for them to send their last ("abort") message
_END = object()
_ENGINE_GROUP = re.compile(r"folovllm-(?P<engine_id>.+)-r\d+(-[0-9a-f]+)?")  # launcher.py's group names
# exceptions a handle caller gets as they are (all take one message, so they unpickle)
_PORTABLE_ERRORS = (QueueFullError, EngineDeadError, ServerDrainingError, RequestDeadlineError)


class EngineUnhealthyError(RuntimeError):
    """check_health's verdict: the engine is dead or stalled, and Serve should replace the replica."""


class _RpcEnded(Exception):
    """LLMServicer ended a call with a status (after status_for mapped the error that caused it)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code, self.details = code, details


class _CallContext:
    """The slice of grpc.aio.ServicerContext that LLMServicer uses, for calls arriving through Serve.

    Written messages go to a queue that the deployment method yields from; abort records the status
    on Serve's RayServegRPCContext (which the proxy sends to the client) and raises.
    """

    def __init__(self, grpc_context=None):
        self.messages: asyncio.Queue = asyncio.Queue()
        self._grpc_context = grpc_context

    async def write(self, message) -> None:
        self.messages.put_nowait(message)

    def time_remaining(self) -> None:
        return None  # Serve does not forward the caller's deadline; its cancellation does reach us

    async def abort(self, code: grpc.StatusCode, details: str):
        if self._grpc_context is not None:
            self._grpc_context.set_code(code)
            self._grpc_context.set_details(details)
        raise _RpcEnded(code, details)


async def _relay(method: Callable[[Any, _CallContext], Awaitable[None]], request,
                 context: _CallContext) -> AsyncIterator[Any]:
    """Run a streaming servicer method, yielding what it writes; its error raises after them."""
    async def run() -> None:
        try:
            await method(request, context)
        finally:
            context.messages.put_nowait(_END)

    task = asyncio.create_task(run())
    try:
        while (message := await context.messages.get()) is not _END:
            yield message
        await task
    finally:
        if not task.done():  # the caller left: cancelling the call aborts the engine request
            task.cancel()
            await asyncio.wait({task})


def _handle_error(ended: _RpcEnded) -> Exception:
    """What a handle caller gets: the engine's own error when it pickles, else the status."""
    cause = ended.__context__  # the exception LLMServicer mapped to ended.code
    if isinstance(cause, InvalidRequestError):
        return PicklableInvalidRequestError.from_error(cause)
    if isinstance(cause, _PORTABLE_ERRORS):
        return cause
    return RuntimeError(f"{ended.code.name}: {ended.details}")


async def check_engine_health(engine: EngineClientProtocol,
                              timeout_s: float = HEALTH_STATUS_TIMEOUT_S) -> EngineStatus:
    """Raise EngineUnhealthyError unless some engine replica is live and the engine makes progress."""
    try:
        status = await asyncio.wait_for(engine.status(), timeout_s)
    except TimeoutError:
        raise EngineUnhealthyError(f"the engine did not report its status within {timeout_s:g} s") from None
    except Exception as e:  # noqa: BLE001 - EngineDeadError, or anything else that keeps it from answering
        raise EngineUnhealthyError(f"the engine is unreachable: {type(e).__name__}: {e}") from None
    if not status.any_live:
        raise EngineUnhealthyError(f"no engine replica is live ({len(status.replicas)} configured)")
    if not status.making_progress:
        raise EngineUnhealthyError(f"the engine is stalled: {status.num_waiting} requests waiting, "
                                   f"no step completed recently")
    return status


def release_engine_groups(is_stale: Callable[[str], bool]) -> int:
    """Remove the placement groups still held by engines for which is_stale(engine_id) is true.

    Ray removes a placement group when its creator dies only if that creator is a detached actor
    (or when the job ends). Ours are created by the SchedulerActor, a child of the (detached) Serve
    replica, so a replica that dies leaves its engine's groups, and their GPUs, behind; and on a
    clean stop the executor releases them on a daemon thread that the actor's kill can cut short.
    Group names are launcher.py's: folovllm-{engine_id}-r{replica_id}[-{hex}] (_ENGINE_GROUP).
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for pg_id, pg in ray.util.placement_group_table().items():
        match = _ENGINE_GROUP.fullmatch(pg.get("name") or "")
        if match is None or pg.get("state") == "REMOVED":
            continue
        if is_stale(match["engine_id"]):
            with contextlib.suppress(Exception):  # removed meanwhile
                remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
                removed += 1
    return removed


def _engine_is_gone(engine_id: str) -> bool:
    from cluster.launcher import NAMESPACE, scheduler_actor_name

    try:
        ray.get_actor(scheduler_actor_name(engine_id), namespace=NAMESPACE)  # pending, alive or restarting
    except ValueError:
        return True
    return False


async def drain(servicer: LLMServicer, timeout_s: float) -> None:
    """Refuse new calls (UNAVAILABLE), let open streams finish for up to timeout_s, abort the rest."""
    servicer.draining = True
    try:
        await asyncio.wait_for(servicer.wait_idle(), timeout_s)
        return
    except TimeoutError:
        logger.warning("drain: %d streams still open after %.1f s; aborting them", servicer.num_in_flight, timeout_s)
    await servicer.abort_all()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(servicer.wait_idle(), ABORT_GRACE_S)


def _sampling_params(params: SamplingParams | dict[str, Any] | None) -> pb.SamplingParams:
    if isinstance(params, dict):
        try:
            params = SamplingParams(**params)
        except TypeError as e:  # an unknown keyword
            raise PicklableInvalidRequestError("sampling_params", str(e)) from None
        except InvalidRequestError as e:
            raise PicklableInvalidRequestError.from_error(e) from None
    elif params is not None and not isinstance(params, SamplingParams):
        raise PicklableInvalidRequestError(
            "sampling_params", f"must be a SamplingParams, a dict of its fields or None, got {type(params).__name__}")
    return conv.sampling_params_to_proto(params)


@serve.deployment(name="LLMServer")
class LLMServer:
    """One engine per replica, served as folovllm.v1.LLMService (gRPC proxy) and to DeploymentHandles."""

    async def __init__(self, args: dict[str, Any]):
        from cluster.launcher import launch_engine  # torch and the workers: only where an engine runs
        from cluster.model_info import resolve
        from workers.tokenizer import load_tokenizer

        self._args = ServeAppArgs.from_args(args)
        config = self._args.engine_config()
        context = serve.get_replica_context()
        self._engine_id = engine_id = f"serve-{context.app_name}-{context.replica_tag}"
        app_engines = f"serve-{context.app_name}-"
        orphans = await asyncio.to_thread(  # left by this app's replicas that died: free their GPUs first
            release_engine_groups, lambda e: e.startswith(app_engines) and _engine_is_gone(e))
        if orphans:
            logger.warning("released %d placement groups of dead engines of app %s", orphans, context.app_name)
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, resolve(config).tokenizer_name, config.model.revision)
            self._engine, self._stop_engine = await asyncio.to_thread(launch_engine, config, engine_id=engine_id)
        except InvalidRequestError as e:  # too few GPUs, TP not dividing the heads, ...: a config error
            raise PicklableInvalidRequestError.from_error(e, prefix="args.engine.") from None
        # Serve admits at most max_ongoing_requests per replica; the servicer's own limit is a backstop
        options = GrpcServerOptions(max_concurrent_requests=self._args.max_ongoing_requests)
        self._servicer = LLMServicer(self._engine, tokenizer, options, ServerMetrics())
        logger.info("folovllm engine %s ready: %s", engine_id, self._engine.model_info)

    # ---- folovllm.v1.LLMService, called by Serve's gRPC proxy (method names are the RPC names) ----

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        async for message in self._grpc_stream(self._servicer.Generate, request, grpc_context):
            yield message

    async def Chat(self, request: pb.ChatRequest, grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        async for message in self._grpc_stream(self._servicer.Chat, request, grpc_context):
            yield message

    async def Abort(self, request: pb.AbortRequest, grpc_context=None) -> pb.AbortResponse:
        return await self._grpc_unary(self._servicer.Abort, request, grpc_context)

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        return await self._grpc_unary(self._servicer.Tokenize, request, grpc_context)

    async def Detokenize(self, request: pb.DetokenizeRequest, grpc_context=None) -> pb.DetokenizeResponse:
        return await self._grpc_unary(self._servicer.Detokenize, request, grpc_context)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context=None) -> pb.ModelInfo:
        return await self._grpc_unary(self._servicer.GetModelInfo, request, grpc_context)

    async def GetServerStatus(self, request: pb.GetServerStatusRequest, grpc_context=None) -> pb.ServerStatus:
        return await self._grpc_unary(self._servicer.GetServerStatus, request, grpc_context)

    async def _grpc_stream(self, method, request, grpc_context) -> AsyncIterator[Any]:
        try:
            async for message in _relay(method, request, _CallContext(grpc_context)):
                yield message
        except _RpcEnded as e:  # the code is already on grpc_context; the proxy sends both
            raise RuntimeError(e.details) from None

    async def _grpc_unary(self, method, request, grpc_context):
        try:
            return await method(request, _CallContext(grpc_context))
        except _RpcEnded as e:
            raise RuntimeError(e.details) from None

    # ---- the DeploymentHandle API, for other Serve applications ----------------------------------

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | dict | None = None, *,
                       request_id: str = "", priority: int = 0) -> AsyncIterator[RequestDelta]:
        """Stream the deltas of a text or token-id prompt; call with handle.options(stream=True).

        Each sibling's last delta has finish_reason. Errors: InvalidRequestError naming the field,
        QueueFullError, EngineDeadError, ServerDrainingError (this replica is shutting down).
        """
        request = pb.GenerateRequest(request_id=request_id, sampling_params=_sampling_params(sampling_params),
                                     priority=priority)
        if isinstance(prompt, str):
            request.prompt = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            request.prompt_token_ids.ids.extend(prompt)
        else:
            raise PicklableInvalidRequestError("prompt", f"must be text or a list of token ids, got {type(prompt).__name__}")
        async for delta in self._handle_stream(self._servicer.Generate, request):
            yield delta

    async def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | dict | None = None, *,
                   enable_thinking: bool | None = None, request_id: str = "",
                   priority: int = 0) -> AsyncIterator[RequestDelta]:
        """Like generate, with the prompt rendered from chat messages by the model's chat template."""
        try:
            proto_messages = conv.chat_messages_to_proto(messages)
        except (KeyError, TypeError) as e:
            raise PicklableInvalidRequestError("messages", f"must be a list of {{'role', 'content'}} dicts: {e!r}") from None
        request = pb.ChatRequest(request_id=request_id, messages=proto_messages,
                                 sampling_params=_sampling_params(sampling_params), priority=priority)
        if enable_thinking is not None:
            request.enable_thinking = enable_thinking
        async for delta in self._handle_stream(self._servicer.Chat, request):
            yield delta

    async def status(self) -> conv.ServerStatus:
        """The engine's replicas, queues and cache, plus this replica's open streams and draining flag."""
        return conv.status_from_proto(await self._handle_unary(self._servicer.GetServerStatus,
                                                               pb.GetServerStatusRequest()))

    async def model_info(self) -> ModelInfo:
        return self._engine.model_info

    async def abort(self, request_id: str) -> bool:
        """Abort a request of this replica by id; True when it was in flight here."""
        return (await self._handle_unary(self._servicer.Abort, pb.AbortRequest(request_id=request_id))).found

    async def _handle_stream(self, method, request) -> AsyncIterator[RequestDelta]:
        try:
            async for message in _relay(method, request, _CallContext()):
                yield conv.delta_from_proto(message)
        except _RpcEnded as e:
            raise _handle_error(e) from None

    async def _handle_unary(self, method, request):
        try:
            return await method(request, _CallContext())
        except _RpcEnded as e:
            raise _handle_error(e) from None

    # ---- HTTP (the route prefix that gRPC routing needs): model and status as JSON ----------------

    async def __call__(self, request) -> dict[str, Any]:
        return {"model_info": dataclasses.asdict(self._engine.model_info),
                "status": dataclasses.asdict(await self.status())}

    # ---- Serve's hooks -------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising makes it replace the replica."""
        await check_engine_health(self._engine)

    async def __del__(self) -> None:
        """Serve's graceful shutdown (after its own wait for ongoing requests): drain, then stop the engine."""
        servicer = getattr(self, "_servicer", None)
        if servicer is None:  # __init__ failed: whatever it started dies with this actor
            return
        await drain(servicer, self._args.drain_timeout_s)
        self._engine.close()
        await asyncio.to_thread(self._stop_engine)
        await asyncio.to_thread(release_engine_groups, lambda e: e == self._engine_id)
        logger.info("folovllm engine %s stopped", self._engine_id)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application builder named by import_path (cluster.serve_app:build_app); `args` are the
    application's args from ray_config.yaml, validated here (ServeArgsError names the bad key)."""
    parsed = ServeAppArgs.from_args(args)
    return LLMServer.options(**parsed.deployment_options()).bind(parsed.model_dump())
