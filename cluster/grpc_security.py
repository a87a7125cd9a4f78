"""Who may call the gRPC front door: TLS / mutual TLS credentials and bearer-token auth."""
import hmac

import grpc

from cluster.grpc_config import GrpcServerOptions

_HEALTH_PREFIX = "/grpc.health.v1.Health/"  # health checks stay open: load balancers probe without tokens


def server_credentials(options: GrpcServerOptions) -> grpc.ServerCredentials:
    """TLS from the options' PEM files; with tls_client_ca_file, clients must present a certificate."""
    key = options.tls_key_file.read_bytes()
    cert = options.tls_cert_file.read_bytes()
    client_ca = options.tls_client_ca_file.read_bytes() if options.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires metadata 'authorization: Bearer <token>' on every call except health checks."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_HEALTH_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
            return handler
        message = "missing authorization metadata" if not given else "invalid bearer token"
        return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, message)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends every call with `code`."""

    async def deny(request_or_iterator, context):
        await context.abort(code, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
