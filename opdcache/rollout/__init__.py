"""Student rollouts: the vLLM engine (engine.py), the rollout stage (stage.py)."""
