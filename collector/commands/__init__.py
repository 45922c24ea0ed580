"""CLI work beyond `collector run`: export, catalog, estimate, economics."""
