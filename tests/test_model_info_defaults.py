"""GetModelInfo fills in every default, the model's own generation settings included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .processes import Serve


def test_model_info_gives_the_models_own_length_penalty_and_ngram_block(
        serve: Serve, tiny_bart: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_bart, tmp_path / "model"))
    generation = model / "generation_config.json"
    config = json.loads(generation.read_text()) if generation.exists() else {}
    config.update(length_penalty=1.75, no_repeat_ngram_size=4)
    generation.write_text(json.dumps(config))
    server = serve("--workers", "0", model=model)
    with grpc.insecure_channel(server.target) as channel:
        info = pb_grpc.SummarizerStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    defaults = info.default_options
    # Every optional field is present (the contract: every field filled in) ...
    for field in pb.GenerationOptions.DESCRIPTOR.fields:
        if field.has_presence:
            assert defaults.HasField(field.name), field.name
    # ... with the checkpoint's own values.
    assert defaults.length_penalty == 1.75
    assert defaults.no_repeat_ngram_size == 4
    assert defaults.long_input != pb.LONG_INPUT_POLICY_UNSPECIFIED
    assert defaults.outputs != pb.OUTPUTS_UNSPECIFIED
