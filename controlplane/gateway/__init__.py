"""The OpenAI-compatible API: keys, errors and (later) the streaming proxy."""
