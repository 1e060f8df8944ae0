"""What a batch runs: the engine's generate, with out-of-memory made an error a caller can act
on. The batch executor calls it in its worker thread."""

from __future__ import annotations

from ..domain import Generated, GenerationParams, PreparedArticle
from ..engines.protocol import Engine
from ..errors import OutOfMemory, is_out_of_memory
from .executor import RunBatch


def generate_batch(engine: Engine) -> RunBatch[PreparedArticle, Generated]:
    def run(params: GenerationParams, batch: list[PreparedArticle]) -> list[Generated]:
        try:
            return engine.generate(params, batch)
        except Exception as error:
            if is_out_of_memory(error):
                # The batcher retries smaller groups; alone, the article gets RESOURCE_EXHAUSTED.
                raise OutOfMemory(
                    f"the model ran out of memory on a batch of {len(batch)}; retry later, or "
                    "send a shorter article or ask for fewer beams") from error
            raise

    return run
