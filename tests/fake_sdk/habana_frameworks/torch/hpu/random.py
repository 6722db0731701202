"""Fake ``torch.hpu`` RNG API. The fake device is the CPU, so these drive torch's CPU
default generator (the real ones drive the HPU generator)."""

import torch

__all__ = [
    "manual_seed",
    "manual_seed_all",
    "seed",
    "seed_all",
    "initial_seed",
    "get_rng_state",
    "set_rng_state",
    "get_rng_state_all",
    "set_rng_state_all",
]


def manual_seed(seed):
    torch.random.default_generator.manual_seed(int(seed))


def manual_seed_all(seed):
    manual_seed(seed)


def seed():
    return torch.random.default_generator.seed()


def seed_all():
    return seed()


def initial_seed():
    return torch.random.default_generator.initial_seed()


def get_rng_state(device="hpu"):
    return torch.random.default_generator.get_state()


def set_rng_state(new_state, device="hpu"):
    torch.random.default_generator.set_state(new_state)


def get_rng_state_all():
    return [get_rng_state()]


def set_rng_state_all(new_states):
    set_rng_state(new_states[0])
