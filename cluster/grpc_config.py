"""Options of the gRPC frontend (`folovllm serve`), as a pydantic model like the rest of the config."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GrpcServerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 or [::] for all interfaces.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one (see server.port).")
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain); with tls_key_file, serve TLS instead of plaintext.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).")
    auth_token: str | None = Field(
        None, min_length=1,
        description="When set, every call except health checks needs metadata 'authorization: Bearer <token>'.")
    max_concurrent_requests: int = Field(
        256, ge=1, description="Generate/Chat streams served at once; more get RESOURCE_EXHAUSTED.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: how long to let in-flight streams finish before aborting them.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free one, unset disables it.")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics HTTP server listens on.")
    health_poll_interval_s: float = Field(
        1.0, gt=0, description="How often engine status is polled for health and gauges.")
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent.")
    enable_reflection: bool = Field(True, description="Serve grpc.reflection.v1alpha for grpcurl and friends.")

    @model_validator(mode="after")
    def _tls_pair(self) -> "GrpcServerOptions":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert_file is not None
