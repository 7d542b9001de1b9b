"""Networks and pretrained components, each loaded from a local directory only."""
