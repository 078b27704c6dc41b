"""Hand-off of our embeddings to LLM engines: one module per target engine, all fed by the same
:class:`~step37_deploy.runtime.ImageEmbedding` (or the service's answer of it).

- :mod:`.sglang`: the body of SGLang's ``/generate`` with precomputed embeddings.
- :mod:`.vllm`: vLLM's encoder-cache files (``ec_consumer``) and an OpenAI-compatible EPD router.
- :mod:`.megatron`: Megatron-Bridge's ``ImageForInsert`` groups (features before the projector).

Each module states the engine version and the source files it was checked against, and knows no
other engine's rules.  Nothing heavy is imported here: ``import step37_deploy.handoff`` is free.
"""
