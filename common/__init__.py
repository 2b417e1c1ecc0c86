"""The ground floor: the error family, the dataclass CLI machinery and helpers every package shares; imports nothing of ours."""
