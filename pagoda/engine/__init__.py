"""pagoda's inference engine: `LLM` (offline batches) and `LLMEngine` (step by step), with vLLM's
interface, on pagoda's paged-KV ops and the models of `pagoda.models`."""
from pagoda.engine.config import EngineConfig
from pagoda.engine.llm import LLM
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pagoda.engine.sampling_params import RequestOutputKind, SamplingParams
from pagoda.engine.structured_params import StructuredOutputsParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutputKind", "RequestOutput",
           "CompletionOutput", "Logprob", "StructuredOutputsParams"]
