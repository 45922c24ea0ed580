"""edge-collector: scheduled sensor collection on the edge, Polars transforms, durable delivery."""

__version__ = "0.1.0"
