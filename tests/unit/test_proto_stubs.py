"""The committed gRPC stubs match protos/folovllm/v1/*.proto and import on older runtimes."""
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from protos import regenerate
from protos.folovllm.v1 import llm_pb2, llm_pb2_grpc

STUB_DIR = regenerate.PROTO_ROOT / "folovllm" / "v1"


def _compile_descriptor(proto: str) -> descriptor_pb2.FileDescriptorProto:
    """The proto compiled by whatever grpc_tools is installed (descriptors do not depend on its version)."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        assert protoc.main(["protoc", f"-I{regenerate.PROTO_ROOT}", f"--descriptor_set_out={out}", proto]) == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    file = fds.file[0]
    _strip_json_names(file.message_type)  # descriptor sets carry them, embedded gencode does not
    return file


def _strip_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)


def test_stub_descriptor_matches_proto():
    committed = descriptor_pb2.FileDescriptorProto.FromString(llm_pb2.DESCRIPTOR.serialized_pb)
    fresh = _compile_descriptor("folovllm/v1/llm.proto")
    assert committed == fresh, "llm_pb2.py drifts from llm.proto: run python protos/regenerate.py"


def test_grpc_stub_has_every_rpc():
    service = llm_pb2.DESCRIPTOR.services_by_name["LLMService"]
    source = (STUB_DIR / "llm_pb2_grpc.py").read_text()
    for method in service.methods:
        assert f"'/folovllm.v1.LLMService/{method.name}'" in source
        assert hasattr(llm_pb2_grpc.LLMServiceServicer, method.name)
    assert "from protos.folovllm.v1 import llm_pb2 as" in source


def test_stubs_import_on_older_runtimes():
    # protobuf >= 5.26.1 and grpcio >= 1.63 (the GPU machine has grpcio 1.84, an older protobuf)
    pb2 = (STUB_DIR / "llm_pb2.py").read_text()
    assert "# Protobuf Python Version: 5.26.1" in pb2
    guard = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),", pb2)
    assert guard is None or (int(guard[1]), int(guard[2])) <= (5, 26)
    generated = re.search(r"GRPC_GENERATED_VERSION = '(\d+)\.(\d+)", (STUB_DIR / "llm_pb2_grpc.py").read_text())
    assert (int(generated[1]), int(generated[2])) <= (1, 84)


def test_regenerated_stubs_are_byte_identical():
    try:
        python = regenerate.pinned_python(regenerate.default_venv())
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:  # no package index here
        pytest.skip(f"cannot install grpcio-tools=={regenerate.GRPCIO_TOOLS_VERSION}: {exc}")
    with tempfile.TemporaryDirectory() as tmp:
        regenerate.generate(python, Path(tmp))
        assert regenerate.drift(Path(tmp)) == [], "stubs drift: run python protos/regenerate.py"


def test_sampling_params_fields_mirror_python():
    from dataclasses import fields

    from scheduler.sampling_params import SamplingParams

    proto_fields = llm_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    for f in fields(SamplingParams):
        assert f.name in proto_fields, f"SamplingParams.{f.name} is missing from llm.proto"
        if f.name not in ("stop", "stop_token_ids"):
            assert proto_fields[f.name].has_presence, f"{f.name} must be proto3 optional (unset = default)"
