"""Python clients of LLMService: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("127.0.0.1:50051") as client:
        for delta in client.generate_stream("Hello", SamplingParams(max_tokens=32)):
            print(delta.text, end="")
        print(client.generate("Hello").text)

Errors are FolovllmError subclasses chosen by the gRPC status code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator

import grpc

from cluster import grpc_convert as conv
from cluster.engine_types import ModelInfo
from cluster.grpc_convert import ServerStatus
from cluster.output_processor import RequestDelta
from protos.folovllm.v1 import llm_pb2 as pb
from protos.folovllm.v1 import llm_pb2_grpc as pb_grpc
from scheduler.output import TokenLogprobs
from scheduler.sampling_params import SamplingParams


class FolovllmError(Exception):
    """A failed call; `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(FolovllmError): ...
class ResourceExhausted(FolovllmError): ...
class Unavailable(FolovllmError): ...
class DeadlineExceeded(FolovllmError): ...
class Unauthenticated(FolovllmError): ...
class Cancelled(FolovllmError): ...


_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
           grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
           grpc.StatusCode.UNAUTHENTICATED: Unauthenticated, grpc.StatusCode.CANCELLED: Cancelled}


def error_from_rpc(err: grpc.RpcError) -> FolovllmError:
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return _ERRORS.get(code, FolovllmError)(code, details or "")


@dataclass
class CompletionResult:
    """One sibling's whole output."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_completion_tokens: int = 0


@dataclass
class GenerateResult:
    request_id: str
    outputs: list[CompletionResult]  # by sibling index
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        """Sibling 0's text: what an n=1 caller wants."""
        return self.outputs[0].text if self.outputs else ""


class _ResultBuilder:
    def __init__(self) -> None:
        self.request_id = ""
        self.outputs: dict[int, CompletionResult] = {}
        self.num_prompt_tokens = self.num_cached_tokens = 0

    def add(self, d: RequestDelta) -> None:
        self.request_id = d.request_id
        out = self.outputs.setdefault(d.index, CompletionResult(d.index))
        out.text += d.text
        out.token_ids += d.token_ids
        if d.logprobs is not None:
            out.logprobs = (out.logprobs or []) + d.logprobs
        out.finish_reason, out.stop_reason = d.finish_reason, d.stop_reason
        out.num_completion_tokens = d.num_completion_tokens
        self.num_prompt_tokens, self.num_cached_tokens = d.num_prompt_tokens, d.num_cached_tokens

    def result(self) -> GenerateResult:
        return GenerateResult(self.request_id, [self.outputs[i] for i in sorted(self.outputs)],
                              self.num_prompt_tokens, self.num_cached_tokens)


def _generate_request(prompt: str | list[int], params: SamplingParams | None, request_id: str,
                      priority: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, sampling_params=conv.sampling_params_to_proto(params),
                             priority=priority)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    return req


def _chat_request(messages: list[dict[str, str]], params: SamplingParams | None, request_id: str, priority: int,
                  enable_thinking: bool | None) -> pb.ChatRequest:
    req = pb.ChatRequest(request_id=request_id, messages=conv.chat_messages_to_proto(messages),
                         sampling_params=conv.sampling_params_to_proto(params), priority=priority)
    if enable_thinking is not None:
        req.enable_thinking = enable_thinking
    return req


def _tokenize_request(text_or_messages: str | list[dict[str, str]], enable_thinking: bool | None):
    if isinstance(text_or_messages, str):
        return pb.TokenizeRequest(text=text_or_messages)
    req = pb.TokenizeRequest(messages=pb.ChatMessages(messages=conv.chat_messages_to_proto(text_or_messages)))
    if enable_thinking is not None:
        req.enable_thinking = enable_thinking
    return req


def _detokenize_request(token_ids: Iterable[int], skip_special_tokens: bool) -> pb.DetokenizeRequest:
    return pb.DetokenizeRequest(token_ids=list(token_ids), skip_special_tokens=skip_special_tokens)


def _channel_args(target: str, root_certificates: str | Path | None, client_cert: str | Path | None,
                  client_key: str | Path | None, tls: bool | None, server_name: str | None):
    """(credentials or None, channel options)."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
               ("grpc.max_send_message_length", 64 * 1024 * 1024)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    use_tls = tls if tls is not None else any(x is not None for x in (root_certificates, client_cert))
    if not use_tls:
        return None, options
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together")
    read = lambda p: Path(p).read_bytes() if p is not None else None  # noqa: E731
    creds = grpc.ssl_channel_credentials(root_certificates=read(root_certificates),
                                         private_key=read(client_key), certificate_chain=read(client_cert))
    return creds, options


class _Base:
    def __init__(self, auth_token: str | None, timeout: float | None, metadata: Iterable[tuple[str, str]] = ()):
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._metadata += tuple(metadata)  # e.g. ("application", "folovllm") for Ray Serve's gRPC proxy
        self.timeout = timeout

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """Blocking client. target: "host:port". TLS when root_certificates or client_cert is given
    (or tls=True: system roots); mutual TLS with client_cert and client_key. timeout: default
    deadline in seconds for each call (None: none). metadata: extra (key, value) pairs sent with every
    call; behind Ray Serve's gRPC proxy with several applications, ("application", "<app name>")."""

    def __init__(self, target: str, *, auth_token: str | None = None, root_certificates: str | Path | None = None,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 tls: bool | None = None, server_name: str | None = None, timeout: float | None = None,
                 metadata: Iterable[tuple[str, str]] = ()):
        super().__init__(auth_token, timeout, metadata)
        creds, options = _channel_args(target, root_certificates, client_cert, client_key, tls, server_name)
        self._channel = (grpc.secure_channel(target, creds, options) if creds is not None
                         else grpc.insecure_channel(target, options))
        self._stub = pb_grpc.LLMServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method, request, timeout):
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def _stream(self, method, request, timeout) -> Iterator[RequestDelta]:
        call = method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            for msg in call:
                yield conv.delta_from_proto(msg)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()  # no-op once finished; aborts the request if the caller stopped early

    def generate_stream(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                        request_id: str = "", priority: int = 0, timeout: float | None = None) -> Iterator[RequestDelta]:
        """Deltas as they are generated; prompt is text or token ids. Closing the iterator early
        (break) cancels the call, which aborts the request on the server."""
        return self._stream(self._stub.Generate, _generate_request(prompt, params, request_id, priority), timeout)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, **kwargs) -> GenerateResult:
        """The whole output at once (the stream, concatenated)."""
        builder = _ResultBuilder()
        for delta in self.generate_stream(prompt, params, **kwargs):
            builder.add(delta)
        return builder.result()

    def chat_stream(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
                    enable_thinking: bool | None = None, request_id: str = "", priority: int = 0,
                    timeout: float | None = None) -> Iterator[RequestDelta]:
        req = _chat_request(messages, params, request_id, priority, enable_thinking)
        return self._stream(self._stub.Chat, req, timeout)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **kwargs) -> GenerateResult:
        builder = _ResultBuilder()
        for delta in self.chat_stream(messages, params, **kwargs):
            builder.add(delta)
        return builder.result()

    def abort(self, request_id: str, timeout: float | None = None) -> bool:
        """True when the request was in flight on this server."""
        return self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout).found

    def tokenize(self, text_or_messages: str | list[dict[str, str]], *, enable_thinking: bool | None = None,
                 timeout: float | None = None) -> list[int]:
        return list(self._unary(self._stub.Tokenize, _tokenize_request(text_or_messages, enable_thinking),
                                timeout).token_ids)

    def detokenize(self, token_ids: Iterable[int], *, skip_special_tokens: bool = True,
                   timeout: float | None = None) -> str:
        return self._unary(self._stub.Detokenize, _detokenize_request(token_ids, skip_special_tokens), timeout).text

    def model_info(self, timeout: float | None = None) -> tuple[ModelInfo, SamplingParams]:
        """The model and the server's default sampling params."""
        return conv.model_info_from_proto(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def status(self, timeout: float | None = None) -> ServerStatus:
        return conv.status_from_proto(self._unary(self._stub.GetServerStatus, pb.GetServerStatusRequest(), timeout))


class AsyncClient(_Base):
    """asyncio client with the same methods as Client (awaitable; *_stream are async iterators).
    Create it inside the event loop that uses it."""

    def __init__(self, target: str, *, auth_token: str | None = None, root_certificates: str | Path | None = None,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 tls: bool | None = None, server_name: str | None = None, timeout: float | None = None,
                 metadata: Iterable[tuple[str, str]] = ()):
        super().__init__(auth_token, timeout, metadata)
        creds, options = _channel_args(target, root_certificates, client_cert, client_key, tls, server_name)
        self._channel = (grpc.aio.secure_channel(target, creds, options) if creds is not None
                         else grpc.aio.insecure_channel(target, options))
        self._stub = pb_grpc.LLMServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _unary(self, method, request, timeout):
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    async def _stream(self, method, request, timeout) -> AsyncIterator[RequestDelta]:
        call = method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            async for msg in call:
                yield conv.delta_from_proto(msg)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()

    def generate_stream(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                        request_id: str = "", priority: int = 0,
                        timeout: float | None = None) -> AsyncIterator[RequestDelta]:
        return self._stream(self._stub.Generate, _generate_request(prompt, params, request_id, priority), timeout)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None, **kwargs) -> GenerateResult:
        builder = _ResultBuilder()
        async for delta in self.generate_stream(prompt, params, **kwargs):
            builder.add(delta)
        return builder.result()

    def chat_stream(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
                    enable_thinking: bool | None = None, request_id: str = "", priority: int = 0,
                    timeout: float | None = None) -> AsyncIterator[RequestDelta]:
        req = _chat_request(messages, params, request_id, priority, enable_thinking)
        return self._stream(self._stub.Chat, req, timeout)

    async def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **kwargs) -> GenerateResult:
        builder = _ResultBuilder()
        async for delta in self.chat_stream(messages, params, **kwargs):
            builder.add(delta)
        return builder.result()

    async def abort(self, request_id: str, timeout: float | None = None) -> bool:
        return (await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout)).found

    async def tokenize(self, text_or_messages: str | list[dict[str, str]], *, enable_thinking: bool | None = None,
                       timeout: float | None = None) -> list[int]:
        resp = await self._unary(self._stub.Tokenize, _tokenize_request(text_or_messages, enable_thinking), timeout)
        return list(resp.token_ids)

    async def detokenize(self, token_ids: Iterable[int], *, skip_special_tokens: bool = True,
                         timeout: float | None = None) -> str:
        req = _detokenize_request(token_ids, skip_special_tokens)
        return (await self._unary(self._stub.Detokenize, req, timeout)).text

    async def model_info(self, timeout: float | None = None) -> tuple[ModelInfo, SamplingParams]:
        resp = await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return conv.model_info_from_proto(resp)

    async def status(self, timeout: float | None = None) -> ServerStatus:
        resp = await self._unary(self._stub.GetServerStatus, pb.GetServerStatusRequest(), timeout)
        return conv.status_from_proto(resp)
