"""Pure-torch reference implementations: the readable spec and the fallback backend."""
