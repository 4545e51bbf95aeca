"""Test and benchmark tooling that is not shipped with the packages (reference environments, fixture builders)."""
