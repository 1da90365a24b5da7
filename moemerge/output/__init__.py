"""Turning checked inputs into an output folder: the tensor plan, the streamed writer, side files and the card."""
