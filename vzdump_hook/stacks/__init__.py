"""Stack drivers: list, stop, start and check application stacks inside a guest."""
