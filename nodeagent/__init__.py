"""llmfleet's node agent: runs on every GPU host. It never imports Django."""

__version__ = "0.1.0"
