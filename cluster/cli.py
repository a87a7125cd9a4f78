"""The `folovllm` command: generate offline, serve over gRPC, chat, status, bench."""
import argparse
import sys

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


def cmd_generate(args) -> int:
    from cluster.cli_args import engine_config_from_args
    from cluster.llm import LLM

    config = engine_config_from_args(args)
    llm = LLM(**config.to_flat())
    params = _sampling_params(args)
    for out in llm.generate(args.prompts, params, use_tqdm=len(args.prompts) > 1):
        for c in out.outputs:
            print(f"--- {out.request_id}.{c.index} ({c.finish_reason}, {len(c.token_ids)} tokens)")
            print((out.prompt or "") + c.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cluster.cli_args import add_engine_args

    parser = argparse.ArgumentParser(prog="folovllm", description="Serve Qwen3 models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate offline, in this process")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    add_engine_args(gen)
    _sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InvalidRequestError as e:
        print(f"folovllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
