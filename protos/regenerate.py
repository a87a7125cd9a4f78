#!/usr/bin/env python3
"""Regenerate the committed Python stubs from protos/folovllm/v1/*.proto.

    python protos/regenerate.py            # rewrite protos/folovllm/v1/*_pb2*.py(i)
    python protos/regenerate.py --check    # exit 1 if the committed stubs differ from a fresh build
    python protos/regenerate.py --out DIR  # write the tree under DIR instead (DIR/folovllm/v1/...)

Why a pinned toolchain: the stubs must import on every machine we run on, including ones with an
older protobuf/grpcio than the developer's. protoc writes a runtime version guard into each
*_pb2.py (from protobuf 5.27 on), and the grpc plugin writes GRPC_GENERATED_VERSION into
*_pb2_grpc.py (an import error from grpcio-tools 1.66 on when the installed grpcio is older).
Stubs from a recent grpcio-tools (1.85 bundles protoc 35 -> "gencode 7.35.1") therefore refuse to
import with protobuf < 7.35 or grpcio < 1.85. We generate with grpcio-tools 1.63.2 instead:
  * *_pb2.py says "Protobuf Python Version: 5.26.1" and carries no runtime guard; it imports with
    any protobuf runtime >= 5.26.1 (5.x, 6.x and 7.x all accept older gencode);
  * *_pb2_grpc.py has GRPC_GENERATED_VERSION = '1.63.2', a warning (never an error) below that,
    and passes _registered_method=True, which needs grpcio >= 1.63.
The pinned grpcio-tools lives in its own virtual environment (created on first use with pip,
cached under ~/.cache/folovllm, or FOLOVLLM_PROTOC_VENV) so that the project's environment keeps
whatever grpcio-tools it has. `--python PY` uses an interpreter that already has it.

The grpc plugin imports the messages as `from folovllm.v1 import llm_pb2`; we rewrite that to
`from protos.folovllm.v1 import llm_pb2` so the stubs import from the repository root while the
descriptors keep the canonical file name folovllm/v1/llm.proto (what reflection and Ray Serve's
gRPC proxy see).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.63.2"  # bundles protoc 26.1 -> gencode 5.26.1, no runtime guard
PROTO_ROOT = Path(__file__).resolve().parent  # protos/: the -I root; files are folovllm/v1/*.proto
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("folovllm/**/*.proto"))


def default_venv() -> Path:
    env = os.environ.get("FOLOVLLM_PROTOC_VENV")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "folovllm" / f"protoc-grpcio-tools-{GRPCIO_TOOLS_VERSION}"


def has_pinned_tools(python: str) -> bool:
    probe = "import grpc_tools, importlib.metadata as m; print(m.version('grpcio-tools'))"
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip() == GRPCIO_TOOLS_VERSION


def pinned_python(venv: Path) -> str:
    """An interpreter with grpcio-tools==GRPCIO_TOOLS_VERSION, creating the venv if needed."""
    python = str(venv / "bin" / "python")
    if Path(python).exists() and has_pinned_tools(python):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    f"grpcio-tools=={GRPCIO_TOOLS_VERSION}"], check=True)
    if not has_pinned_tools(python):
        raise RuntimeError(f"{venv} has no grpcio-tools=={GRPCIO_TOOLS_VERSION}")
    return python


def fix_module_paths(path: Path) -> None:
    """Name the stubs' modules as they are imported from the repository root.

    `from folovllm.v1 import llm_pb2` -> `from protos.folovllm.v1 import llm_pb2` in *_pb2_grpc.py,
    and the message classes' __module__ 'folovllm.v1.llm_pb2' -> 'protos.folovllm.v1.llm_pb2' in
    *_pb2.py, so that pickle (Ray Serve's gRPC proxy pickles every request) can import them.
    """
    text = path.read_text()
    text = re.sub(r"^from folovllm\.", "from protos.folovllm.", text, flags=re.MULTILINE)
    text = text.replace("DESCRIPTOR, 'folovllm.", "DESCRIPTOR, 'protos.folovllm.")
    path.write_text(text)


def generate(python: str, out_root: Path) -> list[Path]:
    """Compile every proto into out_root/folovllm/v1/; returns the generated files."""
    files = proto_files()
    subprocess.run([python, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
                    f"--python_out={out_root}", f"--pyi_out={out_root}",
                    f"--grpc_python_out={out_root}", *files], check=True)
    generated = sorted(p for p in out_root.glob("folovllm/**/*")
                       if p.name.endswith(GENERATED_SUFFIXES))
    for path in generated:
        if path.name.endswith(".py"):
            fix_module_paths(path)
    return generated


def committed_stubs() -> list[Path]:
    return sorted(p for p in PROTO_ROOT.glob("folovllm/**/*") if p.name.endswith(GENERATED_SUFFIXES))


def drift(fresh_root: Path) -> list[str]:
    """Relative paths whose committed stub differs from (or is missing in) the fresh build."""
    fresh = {str(p.relative_to(fresh_root)) for p in fresh_root.glob("folovllm/**/*")
             if p.name.endswith(GENERATED_SUFFIXES)}
    committed = {str(p.relative_to(PROTO_ROOT)) for p in committed_stubs()}
    differing = [rel for rel in sorted(fresh & committed)
                 if not filecmp.cmp(fresh_root / rel, PROTO_ROOT / rel, shallow=False)]
    return sorted(set(differing) | (fresh ^ committed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs drift")
    parser.add_argument("--out", type=Path, help="output root (default: protos/ itself)")
    parser.add_argument("--python", help=f"interpreter with grpcio-tools=={GRPCIO_TOOLS_VERSION}")
    parser.add_argument("--venv", type=Path, default=None, help="where to cache the pinned tools")
    args = parser.parse_args(argv)

    python = args.python or pinned_python(args.venv or default_venv())
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(python, Path(tmp))
            changed = drift(Path(tmp))
        if changed:
            print("stubs drift from the .proto files; run python protos/regenerate.py:", *changed,
                  sep="\n  ")
            return 1
        print("stubs are up to date")
        return 0

    out_root = args.out or PROTO_ROOT
    if out_root.resolve() == PROTO_ROOT:
        with tempfile.TemporaryDirectory() as tmp:  # build aside, then replace: no half-written tree
            for path in generate(python, Path(tmp)):
                dest = PROTO_ROOT / path.relative_to(tmp)
                shutil.copyfile(path, dest)
        for path in committed_stubs():  # stubs of protos that no longer exist
            if not path.with_name(path.name.split("_pb2")[0] + ".proto").exists():
                path.unlink()
    else:
        generate(python, out_root)
    print("generated:", *(str(p) for p in proto_files()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
