"""What waking an idle receiver costs on this host: round trips after gaps of idle time.

    python -m cluster.benchmarks.wake_latency [--hops thread tcp compiled_graph] [--gaps-ms 0,1,10,100]

Three hops of the served path's kind: a thread woken by threading.Event (the actor's loop waking
its step thread), a TCP ping-pong between two processes (the engine link, gRPC), and a Ray
compiled graph with one actor (the step path to a worker). A request that reaches an idle engine
pays each hop's idle cost once on its way to the first token; while the engine steps, every
receiver is awake (the gap-0 row). One JSON line per hop and gap. CPU only.
"""
import argparse
import json
import multiprocessing
import socket
import statistics
import threading
import time


def _samples(gap_ms: float, scale: float) -> int:
    # fewer rounds where each one sleeps longer: every gap gets a few seconds at most
    return max(5, int(scale * (300 if gap_ms < 1 else 200 if gap_ms < 10 else 100 if gap_ms < 100 else 40)))


def _timed_rounds(round_trip, gaps_ms: list[float], scale: float):
    for gap_ms in gaps_ms:
        times = []
        for _ in range(_samples(gap_ms, scale)):
            time.sleep(gap_ms / 1e3)
            t0 = time.perf_counter()
            round_trip()
            times.append(time.perf_counter() - t0)
        yield gap_ms, sorted(times)


def thread_wake():
    ping, pong = threading.Event(), threading.Event()

    def responder():
        while True:
            ping.wait()
            ping.clear()
            pong.set()

    threading.Thread(target=responder, daemon=True).start()

    def round_trip():
        ping.set()
        pong.wait()
        pong.clear()
    return round_trip, None


def _echo(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(64):
        conn.sendall(data)


def tcp_ping_pong():
    listener = socket.create_server(("127.0.0.1", 0))
    peer = multiprocessing.get_context("fork").Process(target=_echo, args=(listener,), daemon=True)
    peer.start()
    conn = socket.create_connection(listener.getsockname())
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip():
        conn.sendall(b"x")
        conn.recv(64)

    def close():
        conn.close()
        peer.join(5)
        listener.close()
    return round_trip, close


def compiled_graph():
    import ray
    from ray.dag import InputNode, MultiOutputNode

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Echo:
        def echo(self, x):
            return x

    actor = Echo.remote()
    ray.get(actor.__ray_ready__.remote())
    with InputNode() as inp:
        dag = MultiOutputNode([actor.echo.bind(inp)]).experimental_compile()

    def round_trip():
        ray.get(dag.execute(0))

    def close():
        dag.teardown()
        ray.kill(actor)
        if started:
            ray.shutdown()
    return round_trip, close


HOPS = {"thread": thread_wake, "tcp": tcp_ping_pong, "compiled_graph": compiled_graph}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hops", nargs="+", choices=list(HOPS), default=list(HOPS))
    p.add_argument("--gaps-ms", default="0,1,10,100", help="idle time before each round trip, comma-separated")
    p.add_argument("--samples-scale", type=float, default=1.0, help="multiplies the rounds per gap")
    args = p.parse_args(argv)
    gaps_ms = [float(g) for g in args.gaps_ms.split(",")]
    rows = []
    for hop in args.hops:
        round_trip, close = HOPS[hop]()
        try:
            round_trip()  # connections and channels set up before timing
            for gap_ms, times in _timed_rounds(round_trip, gaps_ms, args.samples_scale):
                row = {"bench": "wake_latency", "hop": hop, "gap_ms": gap_ms, "n": len(times),
                       "p50_us": round(statistics.median(times) * 1e6, 1),
                       "p90_us": round(times[int(0.9 * (len(times) - 1))] * 1e6, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            if close is not None:
                close()
    return rows


if __name__ == "__main__":
    main()
