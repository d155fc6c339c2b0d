"""turnrl: train multi-turn, tool-using LLM agents with turn-level RL."""
