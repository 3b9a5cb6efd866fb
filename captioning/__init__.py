"""Image captioning: CNN encoder + recurrent decoder (Show and Tell, Show Attend and Tell)."""

__version__ = "0.1.0"
