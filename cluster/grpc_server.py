"""The gRPC front door: LLMService on grpc.aio, plus health, reflection, TLS, auth, metrics, drain.

Tokenizing and the chat template run here, in the frontend process; the engine sees token ids.
Messages are converted in cluster/grpc_convert.py; exceptions become status codes in
status_for() only.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from typing import Any, Awaitable, Callable, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cluster import grpc_convert as conv
from cluster.engine_types import EngineClientProtocol
from cluster.grpc_config import GrpcServerOptions
from cluster.grpc_security import BearerAuthInterceptor, server_credentials
from cluster.metrics import ServerMetrics
from cluster.output_processor import RequestDelta, stream_request
from protos.folovllm.v1 import llm_pb2 as pb
from protos.folovllm.v1 import llm_pb2_grpc as pb_grpc
from scheduler.errors import EngineDeadError, InvalidRequestError, QueueFullError
from scheduler.sampling_params import SamplingParams
from scheduler.token_ids import check_and_pack_token_ids

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMService"].full_name  # "folovllm.v1.LLMService"
_OFFLOAD_CHARS = 16_384  # tokenize longer texts in a thread so the event loop keeps streaming


class TokenizerLike(Protocol):
    """The transformers-style tokenizer calls the frontend makes."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...
    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> Any: ...


class ServerDrainingError(RuntimeError):
    """The server is shutting down and admits no new requests."""


class RequestDeadlineError(TimeoutError):
    """The call's gRPC deadline passed while the request was queued or generating."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one place that maps exceptions to gRPC status codes."""
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "the engine's queue is full"
    if isinstance(exc, (EngineDeadError, ServerDrainingError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "the engine is not running"
    if isinstance(exc, RequestDeadlineError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _grpc_errors(method: Callable[..., Awaitable[Any]]):
    """Wrap a servicer method: an exception it raises ends the call with status_for's code."""

    @functools.wraps(method)
    async def wrapper(self: "LLMServicer", request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # CancelledError (client gone) is a BaseException: not caught
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("%s failed", method.__name__)
            self._metrics.request_errors.labels(code.name).inc()
            await context.abort(code, message)

    return wrapper


class LLMServicer(pb_grpc.LLMServiceServicer):
    def __init__(self, engine: EngineClientProtocol, tokenizer: TokenizerLike, options: GrpcServerOptions,
                 metrics: ServerMetrics):
        self._engine = engine
        self._tokenizer = tokenizer
        self._options = options
        self._metrics = metrics
        self._num_streams = 0  # admitted Generate/Chat calls, from admission to their last message
        self._in_flight: set[str] = set()  # request ids of those streams that reached the engine
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def num_in_flight(self) -> int:
        return self._num_streams

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def abort_all(self) -> None:
        await asyncio.gather(*(self._engine.abort(rid) for rid in list(self._in_flight)))

    # --- streaming RPCs -----------------------------------------------------------------------

    @_grpc_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        arrival = time.monotonic()
        with self._admitted():
            inp = conv.generate_input_from_proto(request)
            if inp.prompt is not None:
                prompt_token_ids = await self._encode(inp.prompt, "prompt")
            else:
                prompt_token_ids = inp.prompt_token_ids
            await self._stream(context, inp.request_id, prompt_token_ids, inp.sampling_params, inp.priority,
                               arrival, "prompt" if inp.prompt is not None else "prompt_token_ids")

    @_grpc_errors
    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> None:
        arrival = time.monotonic()
        with self._admitted():
            inp = conv.chat_input_from_proto(request)
            prompt = self._render_chat(inp.messages, inp.enable_thinking)
            prompt_token_ids = await self._encode(prompt, "messages")
            await self._stream(context, inp.request_id, prompt_token_ids, inp.sampling_params, inp.priority,
                               arrival, "messages")

    async def _stream(self, context: grpc.aio.ServicerContext, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams, priority: int, arrival: float, prompt_field: str) -> None:
        self._check_prompt(prompt_token_ids, prompt_field)
        params.check_vocab(self._engine.model_info.vocab_size)
        if request_id in self._in_flight:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        timeout = context.time_remaining()
        if timeout is not None and timeout > 1e7:
            timeout = None  # grpc reports "no deadline" as a huge number on some versions
        self._in_flight.add(request_id)
        last_token_time = None
        deltas_stream = stream_request(self._engine, request_id, prompt_token_ids, params, self._tokenizer,
                                       priority)
        try:
            async with contextlib.aclosing(deltas_stream), asyncio.timeout(timeout):
                async for deltas in deltas_stream:
                    now = time.monotonic()
                    if any(d.token_ids for d in deltas):
                        if last_token_time is None:
                            self._metrics.time_to_first_token.observe(now - arrival)
                            self._metrics.prompt_tokens.inc(len(prompt_token_ids))
                        else:
                            self._metrics.inter_token_latency.observe(now - last_token_time)
                        last_token_time = now
                    for delta in deltas:
                        self._count(delta)
                        await context.write(conv.delta_to_proto(delta))
        except TimeoutError:  # the engine request was aborted on the way out of stream_request
            phase = "while queued" if last_token_time is None else "mid-generation"
            raise RequestDeadlineError(f"deadline exceeded {phase} after {time.monotonic() - arrival:.3f} s; "
                                       f"request {request_id} aborted") from None
        finally:
            self._in_flight.discard(request_id)
        self._metrics.e2e_latency.observe(time.monotonic() - arrival)

    def _count(self, delta: RequestDelta) -> None:
        self._metrics.generation_tokens.inc(len(delta.token_ids))
        if delta.finish_reason is not None:
            self._metrics.requests.labels(delta.finish_reason).inc()

    # --- unary RPCs ---------------------------------------------------------------------------

    @_grpc_errors
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        if not request.request_id:
            raise InvalidRequestError("request_id", "must not be empty")
        found = request.request_id in self._in_flight
        await self._engine.abort(request.request_id)
        return pb.AbortResponse(found=found)

    @_grpc_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidRequestError("text", "set text or messages")
        if which == "text":
            return pb.TokenizeResponse(token_ids=await self._encode(request.text, "text"))
        messages = conv.chat_messages_from_proto(request.messages.messages)
        enable_thinking = request.enable_thinking if request.HasField("enable_thinking") else None
        prompt = self._render_chat(messages, enable_thinking)
        return pb.TokenizeResponse(token_ids=await self._encode(prompt, "messages"), prompt=prompt)

    @_grpc_errors
    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        ids = list(request.token_ids)
        self._check_token_ids(ids, "token_ids")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=self._tokenizer.decode(ids, skip_special_tokens=skip))

    @_grpc_errors
    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return conv.model_info_to_proto(self._engine.model_info)

    @_grpc_errors
    async def GetServerStatus(self, request, context) -> pb.ServerStatus:
        status = await self._engine.status()
        return conv.status_to_proto(status, self.num_in_flight, self.draining)

    # --- helpers ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _admitted(self):
        """Hold one of max_concurrent_requests slots for the whole call; refuse while draining."""
        if self.draining:
            raise ServerDrainingError("the server is draining (shutting down); retry on another server")
        limit = self._options.max_concurrent_requests
        if self._num_streams >= limit:
            raise QueueFullError(f"the server has {limit} requests in flight (max_concurrent_requests); "
                                 f"retry later")
        self._num_streams += 1
        self._idle.clear()
        self._metrics.in_flight.set(self._num_streams)
        try:
            yield
        finally:
            self._num_streams -= 1
            self._metrics.in_flight.set(self._num_streams)
            if self._num_streams == 0:
                self._idle.set()

    def _check_token_ids(self, ids: list[int], field: str) -> None:
        # the check alone: the packing it makes on the way is the scheduler actor's to make
        check_and_pack_token_ids(ids, self._engine.model_info.vocab_size, field)

    def _check_prompt(self, ids: list[int], field: str) -> None:
        if not ids:
            raise InvalidRequestError(field, "the prompt must not be empty")
        self._check_token_ids(ids, field)
        max_len = self._engine.model_info.max_model_len
        if len(ids) > max_len:
            raise InvalidRequestError(field, f"the prompt has {len(ids)} tokens, over max_model_len ({max_len})")

    async def _encode(self, text: str, field: str) -> list[int]:
        if len(text) < _OFFLOAD_CHARS:
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        return list(await asyncio.to_thread(self._tokenizer.encode, text, add_special_tokens=False))

    def _render_chat(self, messages: list[dict[str, str]], enable_thinking: bool | None) -> str:
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        try:
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                       **kwargs)
        except Exception as exc:  # jinja raises for conversations the template rejects
            raise InvalidRequestError("messages", f"the chat template rejected them: {exc}") from exc


class FolovllmServer:
    """A built, not yet started, frontend: the grpc.aio server with its health poller and metrics."""

    def __init__(self, engine: EngineClientProtocol, tokenizer: TokenizerLike, options: GrpcServerOptions):
        self.options = options
        self.metrics = ServerMetrics()
        self.servicer = LLMServicer(engine, tokenizer, options, self.metrics)
        self.health = health.aio.HealthServicer()
        self._engine = engine
        interceptors = [BearerAuthInterceptor(options.auth_token)] if options.auth_token else []
        limit = options.max_message_bytes
        self.grpc_server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        pb_grpc.add_LLMServiceServicer_to_server(self.servicer, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        if options.enable_reflection:
            from grpc_reflection.v1alpha import reflection
            names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                     reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.grpc_server)
        address = f"{options.host}:{options.port}"
        if options.uses_tls:
            self.port = self.grpc_server.add_secure_port(address, server_credentials(options))
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        self.metrics_port: int | None = None
        self._poller: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        await self._set_serving(False)  # until the first status poll says otherwise
        await self.grpc_server.start()
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(self.options.metrics_port, self.options.metrics_host)
        self._poller = asyncio.create_task(self._poll_status())

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop admitting (UNAVAILABLE), let in-flight streams finish for up to timeout_s, then stop."""
        timeout_s = self.options.drain_timeout_s if timeout_s is None else timeout_s
        self.servicer.draining = True
        await self._set_serving(False)
        try:
            await asyncio.wait_for(self.servicer.wait_idle(), timeout_s)
        except TimeoutError:
            logger.warning("drain: %d requests still in flight after %.1f s; aborting them",
                           self.servicer.num_in_flight, timeout_s)
            await self.servicer.abort_all()
        await self.stop(grace_s=1.0)

    async def stop(self, grace_s: float | None = 0) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self.grpc_server.stop(grace_s)
        self.metrics.stop_http()
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()

    async def _poll_status(self) -> None:
        interval = self.options.health_poll_interval_s
        while True:
            try:
                status = await asyncio.wait_for(self._engine.status(), max(2 * interval, 1.0))
                self.metrics.update_from_status(status)
                healthy = status.any_live and status.making_progress
            except Exception:  # an engine that cannot report is not serving
                logger.warning("engine status poll failed", exc_info=True)
                healthy = False
            await self._set_serving(healthy and not self.servicer.draining)
            await asyncio.sleep(interval)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


def build_server(engine_client: EngineClientProtocol, tokenizer: TokenizerLike,
                 options: GrpcServerOptions | None = None) -> FolovllmServer:
    """Build (bind, not start) a frontend; call from inside the event loop that will run it."""
    return FolovllmServer(engine_client, tokenizer, options or GrpcServerOptions())


async def serve(engine_client: EngineClientProtocol, tokenizer: TokenizerLike,
                options: GrpcServerOptions | None = None,
                on_started: Callable[[FolovllmServer], None] | None = None) -> None:
    """Run a frontend until SIGTERM or SIGINT, then drain it (options.drain_timeout_s)."""
    server = build_server(engine_client, tokenizer, options)
    await server.start()
    logger.info("folovllm gRPC serving %s on %s:%d%s", SERVICE_NAME, server.options.host, server.port,
                f", metrics on :{server.metrics_port}" if server.metrics_port is not None else "")
    loop = asyncio.get_running_loop()
    drain_task: list[asyncio.Task] = []

    def on_signal() -> None:  # the first signal drains, a second one stops at once
        logger.info("stopping now" if drain_task else
                    f"draining: no new requests; up to {server.options.drain_timeout_s:g} s for those in flight")
        drain_task.append(loop.create_task(server.drain() if not drain_task else server.stop(0)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        if on_started is not None:
            on_started(server)
        await server.wait_for_termination()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if not server._stopped.is_set():
            await server.stop()
