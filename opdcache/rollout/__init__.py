"""Student rollouts: prompts (prompts.py), the vLLM engine (engine.py), the rollout stage (stage.py)."""
