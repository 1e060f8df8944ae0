"""The committed stubs are generated from the committed .proto, and the contract's names hold."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from google.protobuf import descriptor_pb2

from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    fresh = descriptor_pb2.FileDescriptorProto()
    # Read the fresh descriptor without importing it into the global pool (it would clash).
    source = (tmp_path / "summarizer" / "v1" / "summarizer_pb2.py").read_text()
    start = source.index("AddSerializedFile(b'") + len("AddSerializedFile(")
    end = source.index("')", start) + 1
    fresh.ParseFromString(eval(source[start:end]))  # noqa: S307 - a bytes literal protoc wrote
    committed = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(committed)
    assert committed == fresh, (
        "clients/python/summarizer_client/gen is stale: run `python protos/generate.py`")


def test_contract_names() -> None:
    assert pb.DESCRIPTOR.package == "summarizer.v1"
    service = pb.DESCRIPTOR.services_by_name["Summarizer"]
    assert [m.name for m in service.methods] == ["Summarize", "SummarizeStream", "GetModelInfo"]
    stream = service.methods_by_name["SummarizeStream"]
    assert stream.client_streaming and stream.server_streaming
    assert pb.Article.DESCRIPTOR.fields_by_name["id"].number == 1
    assert pb.Article.DESCRIPTOR.fields_by_name["text"].number == 2
    options = pb.GenerationOptions.DESCRIPTOR.fields_by_name
    assert [options[n].number for n in ("summary_max_tokens", "summary_min_tokens",
                                        "headline_max_tokens", "num_beams")] == [1, 2, 3, 4]
    result = pb.ArticleResult.DESCRIPTOR.fields_by_name
    assert [result[n].number for n in ("id", "summary", "headline", "input_tokens",
                                       "truncated")] == [1, 2, 3, 4, 5]
    assert pb.SummarizeRequest.DESCRIPTOR.fields_by_name["options"].number == 2
    assert pb.SummarizeResponse.DESCRIPTOR.fields_by_name["results"].number == 1
