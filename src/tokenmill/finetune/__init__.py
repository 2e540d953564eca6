"""Fine-tuning after pretraining: GRPO with verifiable rewards (`grpo.py`), its tasks, rewards and objective."""
