"""The fleet: node agents, the model catalog, placements and their load history."""
