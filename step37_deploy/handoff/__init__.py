"""Hand-off to LLM engines: one module per target engine, all fed by the same ``ImageEmbedding``.

Nothing heavy is imported here; import the engine's module (``step37_deploy.handoff.vllm``, ...).
"""
