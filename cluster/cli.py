"""The `folovllm` command: serve over gRPC, generate, chat, status, bench."""
import argparse
import asyncio
import logging
import sys

from pydantic import ValidationError

from scheduler.errors import InvalidRequestError


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of this request's sampling")
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args):
    from scheduler.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _client_args(parser: argparse.ArgumentParser, required: bool) -> None:
    g = parser.add_argument_group("server connection")
    g.add_argument("--server", required=required, help="host:port of a running `folovllm serve`")
    g.add_argument("--auth-token", help="bearer token, when the server asks for one")
    g.add_argument("--tls-ca", help="PEM root certificate to verify the server with (turns TLS on)")


def _client(args):
    from cluster.client import Client

    return Client(args.server, auth_token=args.auth_token, root_certificates=args.tls_ca)


def cmd_generate(args) -> int:
    params = _sampling_params(args)
    if args.server:
        with _client(args) as client:
            for prompt in args.prompts:
                for delta in client.generate_stream(prompt, params):
                    print(delta.text, end="", flush=True)
                print()
        return 0
    from cluster.cli_args import engine_config_from_args
    from cluster.llm import LLM

    llm = LLM(**engine_config_from_args(args).to_flat())
    for out in llm.generate(args.prompts, params, use_tqdm=len(args.prompts) > 1):
        for c in out.outputs:
            print(f"--- {out.request_id}.{c.index} ({c.finish_reason}, {len(c.token_ids)} tokens)")
            print((out.prompt or "") + c.text)
    return 0


def cmd_chat(args) -> int:
    """An interactive conversation with a running server; an empty line or EOF ends it."""
    params = _sampling_params(args)
    messages = []
    with _client(args) as client:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            reply = []
            for delta in client.chat_stream(messages, params, enable_thinking=args.enable_thinking):
                reply.append(delta.text)
                print(delta.text, end="", flush=True)
            print()
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_status(args) -> int:
    with _client(args) as client:
        status = client.status()
    print(f"live: {status.any_live}  making progress: {status.making_progress}  waiting: {status.num_waiting}  "
          f"preemptions: {status.num_preemptions}  streams open here: {status.num_in_flight}"
          f"{'  (draining)' if status.draining else ''}")
    print(f"{'replica':>7} {'live':>5} {'running':>8} {'waiting':>8} {'kv usage':>9} {'cache hits':>10} {'restarts':>9}")
    for r in status.replicas:
        print(f"{r.replica_id:>7} {str(r.live):>5} {r.num_running:>8} {r.num_waiting:>8} {r.kv_usage:>9.1%} "
              f"{r.prefix_cache_hit_rate:>10.1%} {r.worker_restarts:>9}")
    return 0


def cmd_serve(args) -> int:
    """Embedded (or joined) Ray, the engine's actors, and the gRPC frontend in this process."""
    from cluster.cli_args import engine_config_from_args, model_from_args
    from cluster.grpc_config import GrpcServerOptions
    from cluster.grpc_server import serve
    from cluster.launcher import launch_engine
    from cluster.model_info import resolve
    from workers.tokenizer import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = engine_config_from_args(args)
    options = model_from_args(args, GrpcServerOptions)
    tokenizer = load_tokenizer(resolve(config).tokenizer_name, config.model.revision)
    client, shutdown = launch_engine(config)
    try:
        asyncio.run(serve(client, tokenizer, options))
    finally:
        shutdown()
    return 0


def cmd_bench_serve(args) -> int:
    from cluster.benchmarks import serve_bench

    return serve_bench.run(args)


def cmd_bench_offline(args) -> int:
    from cluster.benchmarks import offline

    offline.main([args.which, *args.argv])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cluster.cli_args import add_engine_args, add_model_args
    from cluster.grpc_config import GrpcServerOptions

    parser = argparse.ArgumentParser(prog="folovllm", description="Serve Qwen3 models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the engine on Ray and serve it over gRPC")
    add_engine_args(serve)
    add_model_args(serve.add_argument_group("gRPC server"), GrpcServerOptions)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate offline in this process, or through --server")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    add_engine_args(gen)
    _sampling_args(gen)
    _client_args(gen, required=False)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat interactively with a running server")
    _client_args(chat, required=True)
    _sampling_args(chat)
    chat.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=True)
    chat.set_defaults(func=cmd_chat)

    status = sub.add_parser("status", help="replicas, queues and cache of a running server")
    _client_args(status, required=True)
    status.set_defaults(func=cmd_status)

    from cluster.benchmarks import serve_bench

    bench = sub.add_parser("bench", help="benchmarks: online serving against a server, or the offline engine")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bench_serve = bench_sub.add_parser("serve", help="TTFT, TPOT, ITL, throughput and goodput of a running server "
                                       "over a sweep of request rates (like `vllm bench serve`)")
    serve_bench.add_args(bench_serve)
    bench_serve.set_defaults(func=cmd_bench_serve)
    offline = bench_sub.add_parser("offline", help="the engine in this process (cluster.benchmarks.offline)")
    offline.add_argument("which", choices=["throughput", "hf", "latency", "prefix"])
    offline.add_argument("argv", nargs=argparse.REMAINDER, metavar="ARGS",
                         help="passed on; `folovllm bench offline throughput --help` lists them")
    offline.set_defaults(func=cmd_bench_offline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InvalidRequestError, ValidationError) as e:
        print(f"folovllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
