from .policy import WEIGHT_BINS, Policy, weight_factor
from .ppo import PPO, PPOSettings, Step, sample_actions

__all__ = ["WEIGHT_BINS", "Policy", "weight_factor", "PPO", "PPOSettings", "Step", "sample_actions"]
