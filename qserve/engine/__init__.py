"""The engine: scheduler, model runner, sampler, and the LLMEngine / LLM that drive them."""
