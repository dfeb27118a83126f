"""``privatune serve``: the tuned classifier as an HTTP service behind API keys (docs/serving.md)."""
