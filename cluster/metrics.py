"""Prometheus metrics of one frontend, in a registry of its own (tests run several servers)."""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cluster.engine_types import EngineStatus

# Latency buckets in seconds: token latencies sit in 5 ms .. 1 s, whole requests in 0.1 s .. minutes.
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("folovllm_requests", "Finished sequences by finish reason.",
                                ["finish_reason"], registry=r)
        self.request_errors = Counter("folovllm_request_errors", "Requests that ended with a gRPC error.",
                                      ["code"], registry=r)
        self.prompt_tokens = Counter("folovllm_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=r)
        self.generation_tokens = Counter("folovllm_generation_tokens", "Tokens generated.", registry=r)
        self.time_to_first_token = Histogram(
            "folovllm_time_to_first_token_seconds", "Arrival to first generated token.",
            buckets=_TOKEN_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "folovllm_inter_token_latency_seconds", "Between successive steps that produced tokens.",
            buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "folovllm_e2e_request_latency_seconds", "Arrival to the last sibling finishing.",
            buckets=_REQUEST_BUCKETS, registry=r)
        self.in_flight = Gauge("folovllm_frontend_requests_in_flight",
                               "Generate/Chat streams open on this server.", registry=r)
        self.num_waiting = Gauge("folovllm_num_requests_waiting", "Requests queued in the engine.",
                                 registry=r)
        self.num_running = Gauge("folovllm_num_requests_running", "Sequences running on all replicas.",
                                 registry=r)
        self.kv_usage = Gauge("folovllm_kv_cache_usage_ratio", "Fraction of KV blocks in use.",
                              ["replica"], registry=r)
        self.prefix_cache_hit_rate = Gauge("folovllm_prefix_cache_hit_rate",
                                           "Fraction of prompt tokens served from the prefix cache.",
                                           ["replica"], registry=r)
        self.replica_live = Gauge("folovllm_replica_live", "1 while the replica's workers are up.",
                                  ["replica"], registry=r)
        self.replica_running = Gauge("folovllm_replica_num_running", "Sequences running on the replica.",
                                     ["replica"], registry=r)
        self.replica_waiting = Gauge("folovllm_replica_num_waiting", "Sequences waiting for the replica.",
                                     ["replica"], registry=r)
        self.worker_restarts = Gauge("folovllm_worker_restarts", "Worker restarts of the replica (cumulative).",
                                     ["replica"], registry=r)
        self.preemptions = Gauge("folovllm_num_preemptions", "Sequences preempted since start (cumulative).",
                                 registry=r)
        self.engine_healthy = Gauge("folovllm_engine_healthy",
                                    "1 while a replica is live and the engine makes progress.", registry=r)
        self._http = None
        self._http_thread: threading.Thread | None = None

    def update_from_status(self, status: EngineStatus) -> None:
        self.num_waiting.set(status.num_waiting)
        self.num_running.set(sum(rep.num_running for rep in status.replicas))
        self.preemptions.set(status.num_preemptions)
        self.engine_healthy.set(1 if status.any_live and status.making_progress else 0)
        for rep in status.replicas:
            label = str(rep.replica_id)
            self.kv_usage.labels(label).set(rep.kv_usage)
            self.prefix_cache_hit_rate.labels(label).set(rep.prefix_cache_hit_rate)
            self.replica_live.labels(label).set(1 if rep.live else 0)
            self.replica_running.labels(label).set(rep.num_running)
            self.replica_waiting.labels(label).set(rep.num_waiting)
            self.worker_restarts.labels(label).set(rep.worker_restarts)

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics; returns the bound port (port 0 picks a free one)."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
